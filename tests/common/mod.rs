pub mod minilm;
pub mod tiny;
