//! Threads: a model is `Send` (it may move to another thread, and each thread may have its own)
//! but not `Sync` (tch's `Tensor` is not), so threads share one model through a `Mutex`. Every
//! case gives the values of the same traces run on one thread, bit for bit (the linear kernel is
//! fixed to libtorch's for the whole binary, so the kernel choice cannot differ between threads).

mod common;

use std::sync::{Arc, Mutex};

use common::minilm::{minilm, PARIS, ROME};
use nnsight::models::linear::{set_linear_kernel, LinearKernel};
use nnsight::prelude::*;
use nnsight::{Bert, LanguageModel};

const SENTENCES: [&str; 4] = [PARIS, ROME, "A short sentence.", "Rust is a systems programming language."];

fn assert_send<T: Send>() {}

/// Layer 3's output at every position, and the mean of the last layer: what each case compares.
fn probe(model: &LanguageModel<Bert>, text: &str) -> (Tensor, Tensor) {
    trace!(model, text, {
        let mid = model.encoder.layer[3].output.save();
        let last = model.encoder.layer[5].output.mean_dim(1, false, Kind::Float);
        (mid, last)
    })
    .unwrap()
}

fn single_threaded() -> Vec<(Tensor, Tensor)> {
    set_linear_kernel(LinearKernel::Libtorch);
    let model = minilm();
    SENTENCES.iter().map(|s| probe(&model, s)).collect()
}

fn same(a: &[(Tensor, Tensor)], b: &[(Tensor, Tensor)]) {
    assert_eq!(a.len(), b.len());
    for ((a0, a1), (b0, b1)) in a.iter().zip(b) {
        assert!(a0.equal(b0) && a1.equal(b1));
    }
}

#[test]
fn a_model_is_send_and_traces_on_the_thread_it_moved_to() {
    assert_send::<LanguageModel<Bert>>();
    let want = single_threaded();
    let model = minilm();
    let got = std::thread::spawn(move || SENTENCES.iter().map(|s| probe(&model, s)).collect::<Vec<_>>()).join().unwrap();
    same(&got, &want);
}

#[test]
fn one_model_per_thread_at_the_same_time() {
    let want = single_threaded();
    let results: Vec<Vec<(Tensor, Tensor)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    let model = minilm();
                    // Several rounds, so the two threads' traces overlap in time.
                    let mut out = Vec::new();
                    for _ in 0..3 {
                        out = SENTENCES.iter().map(|t| probe(&model, t)).collect();
                    }
                    out
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &results {
        same(r, &want);
    }
    assert!(!nnsight::is_tracing());
}

#[test]
fn threads_share_one_model_through_a_mutex() {
    let want = single_threaded();
    let model = Arc::new(Mutex::new(minilm()));
    let results: Vec<Vec<(Tensor, Tensor)>> = (0..2)
        .map(|_| {
            let model = Arc::clone(&model);
            std::thread::spawn(move || {
                SENTENCES
                    .iter()
                    .map(|t| {
                        let m = model.lock().unwrap();
                        probe(&m, t)
                    })
                    .collect()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    for r in &results {
        same(r, &want);
    }
}
