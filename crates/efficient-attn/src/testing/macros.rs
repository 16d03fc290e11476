//! The macros that turn specs into `#[test]` functions: for the registry
//! ([`contract_tests!`](crate::contract_tests), [`contract_tests_against!`](crate::contract_tests_against))
//! and for one spec of your own ([`contract_tests_for!`](crate::contract_tests_for)).

/// Generates one `#[test]` per check for every registered variant on one device.
///
/// ```ignore
/// efficient_attn::contract_tests!(burn::tensor::Device::flex());
/// ```
#[macro_export]
macro_rules! contract_tests {
    ($device:expr) => {
        $crate::__registered_variants!(__contract_modules, $device);
    };
}

/// Like [`contract_tests!`](crate::contract_tests) on a second device, plus a test per variant
/// comparing that device with a reference device within a tolerance.
///
/// `$device` is an `Option<Device>`: `None` skips the tests (with a message), for devices that
/// may be absent.
///
/// ```ignore
/// efficient_attn::contract_tests_against!(wgpu_device_if_any(), burn::tensor::Device::flex(), 1e-4);
/// ```
#[macro_export]
macro_rules! contract_tests_against {
    ($device:expr, $reference:expr, $tolerance:expr) => {
        $crate::__registered_variants!(__contract_modules_against, $device, $reference, $tolerance);
    };
}

/// Generates one `#[test]` per check for your own spec (a core outside this crate).
///
/// ```ignore
/// efficient_attn::contract_tests_for!(my_attention, my_spec(), burn::tensor::Device::flex());
/// ```
#[macro_export]
macro_rules! contract_tests_for {
    ($name:ident, $spec:expr, $device:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            fn run(check: $crate::testing::Check) {
                let device = $device;
                $crate::testing::run(&$spec, check, &device);
            }
            #[test]
            fn shapes() {
                run($crate::testing::Check::Shapes)
            }
            #[test]
            fn exact() {
                run($crate::testing::Check::Exact)
            }
            #[test]
            fn padding() {
                run($crate::testing::Check::Padding)
            }
            #[test]
            fn causal() {
                run($crate::testing::Check::Causal)
            }
            #[test]
            fn batch() {
                run($crate::testing::Check::Batch)
            }
            #[test]
            fn determinism() {
                run($crate::testing::Check::Determinism)
            }
            #[test]
            fn gradients() {
                run($crate::testing::Check::Gradients)
            }
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __registered_specs {
    ($(;)? $($module:ident { $($variant:ident($kind:literal, $config:ident => $core:ident)),+ $(,)? }),* $(,)?) => {
        vec![$($(
            <$crate::$config as $crate::testing::Contract>::contract()
                .into_iter()
                .map(|spec| ($kind, spec))
                .collect::<Vec<_>>(),
        )+)*]
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __contract_modules {
    ($device:expr; $($module:ident { $($variant:ident($kind:literal, $config:ident => $core:ident)),+ $(,)? }),* $(,)?) => {
        $($(
            #[allow(non_snake_case)]
            mod $variant {
                #[allow(unused_imports)]
                use super::*;
                fn run(check: $crate::testing::Check) {
                    let device = $device;
                    let specs = <$crate::$config as $crate::testing::Contract>::contract();
                    assert!(!specs.is_empty(), "{} has no contract spec", $kind);
                    for spec in &specs {
                        $crate::testing::run(spec, check, &device);
                    }
                }
                #[test] fn shapes() { run($crate::testing::Check::Shapes) }
                #[test] fn exact() { run($crate::testing::Check::Exact) }
                #[test] fn padding() { run($crate::testing::Check::Padding) }
                #[test] fn causal() { run($crate::testing::Check::Causal) }
                #[test] fn batch() { run($crate::testing::Check::Batch) }
                #[test] fn determinism() { run($crate::testing::Check::Determinism) }
                #[test] fn gradients() { run($crate::testing::Check::Gradients) }
            }
        )+)*
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __contract_modules_against {
    ($device:expr, $reference:expr, $tolerance:expr; $($module:ident { $($variant:ident($kind:literal, $config:ident => $core:ident)),+ $(,)? }),* $(,)?) => {
        $($(
            #[allow(non_snake_case)]
            mod $variant {
                #[allow(unused_imports)]
                use super::*;
                fn specs() -> Vec<$crate::testing::Spec<$crate::Attention>> {
                    <$crate::$config as $crate::testing::Contract>::contract()
                }
                fn device() -> Option<burn::tensor::Device> {
                    let device = $device;
                    if device.is_none() {
                        $crate::testing::skipped(
                            concat!(module_path!(), " (", $kind, ")"),
                            "the device under test is not available",
                        );
                    }
                    device
                }
                fn run(check: $crate::testing::Check) {
                    let Some(device) = device() else { return };
                    for spec in &specs() {
                        $crate::testing::run(spec, check, &device);
                    }
                }
                #[test] fn shapes() { run($crate::testing::Check::Shapes) }
                #[test] fn exact() { run($crate::testing::Check::Exact) }
                #[test] fn padding() { run($crate::testing::Check::Padding) }
                #[test] fn causal() { run($crate::testing::Check::Causal) }
                #[test] fn batch() { run($crate::testing::Check::Batch) }
                #[test] fn determinism() { run($crate::testing::Check::Determinism) }
                #[test] fn gradients() { run($crate::testing::Check::Gradients) }
                #[test] fn matches_reference_device() {
                    let Some(device) = device() else { return };
                    let reference = $reference;
                    for spec in &specs() {
                        if let Err(v) = $crate::testing::check_cross_device(spec, &device, &reference, $tolerance) {
                            panic!("{v}");
                        }
                    }
                }
            }
        )+)*
    };
}
