//! Block-sparse attention over permuted sequences ([`ElementRule::Positions`], Reformer's
//! sorted buckets and Routing's cluster windows): the fused kernel against the gathered
//! composition, forward (output and row log-sum-exp) and backward through both outputs, with
//! hidden keys, causality, the self score and rows that see no key.

use burn::tensor::Device;
use efficient_attn::testing::check_positions_against_composed;

#[test]
fn attention_by_original_positions_equals_its_composition_with_the_log_sum_exp() {
    check_positions_against_composed(&Device::flex());
}
