//! Datasets: generated (ListOps, sequence-to-sequence), read from disk (labelled text, corpora),
//! tokenised, and batched by a loader whose order is reproducible across resumes.

pub mod batching;
pub mod listops;
pub mod loader;
pub mod prepare;
pub mod text;
pub mod tokenize;
