//! The integration tests of `efficient-attn`: the contract suite on Flex for every registered
//! variant, the suite's own tests (it catches broken variants), configuration and wrapper tests.

mod broken;
mod config;
mod decoding;
mod fused;
mod kernels;
mod layouts;
mod mha;
mod positions;

mod contract {
    efficient_attn::contract_tests!(burn::tensor::Device::flex());
}
