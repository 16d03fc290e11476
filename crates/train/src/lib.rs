#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod attention_cmd;
pub mod bench;
pub mod device;
