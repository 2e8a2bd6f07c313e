#[macro_use]
pub mod isolate;
pub mod folders;
pub mod minilm;
pub mod tiny;
pub mod decoder_fixtures;
