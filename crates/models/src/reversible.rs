//! Reversible residual stacks (Kitaev et al. 2020, *Reformer*, arXiv:2001.04451, §3; the
//! reversible residual network of Gomez et al. 2017, arXiv:1707.04585).
//!
//! A reversible stack duplicates its input into two halves `x₁ = x₂ = x`; layer `l` computes
//!
//! ```text
//! y₁ = x₁ + F_l(x₂)      F_l(h) = Attention(Norm(h))      (with its output dropout)
//! y₂ = x₂ + G_l(y₁)      G_l(h) = Dropout(FeedForward(Norm(h)))
//! ```
//!
//! and the stack's output is the mean `(y₁ + y₂)/2` (as lucidrains' `reformer-pytorch`; trax
//! concatenates the halves instead). Each layer is invertible, `x₂ = y₂ − G_l(y₁)`,
//! `x₁ = y₁ − F_l(x₂)`, so training need not keep any layer's activations:
//!
//! - **Forward** ([`ReversibleTape`] in the input's extras, on an autodiff device): the layers
//!   run on untracked tensors with untracked copies of their parameters, keeping only the last
//!   pair `(y₁, y₂)`; the autodiff graph continues from a leaf standing for their mean.
//! - **Backward** ([`ReversibleTape::gradients`], after `loss.backward()`): from the leaf's
//!   gradient, for each layer from the last: reconstruct `(x₁, x₂)` from `(y₁, y₂)` without a
//!   graph, run the layer again on tracked copies of `(x₁, x₂)` and backpropagate
//!   `Σ y₁·ĝ₁ + Σ y₂·ĝ₂ (+ the layer's auxiliary loss)`, which gives the layer's parameter
//!   gradients and `(ĝ₁, ĝ₂)` of its inputs. Finally `x`'s own graph (the embeddings) is
//!   backpropagated with `ĝ₁ + ĝ₂`. Activation memory is one layer's, whatever the depth; the
//!   price is one more forward pass per layer (two in total, plus the backward).
//! - **Dropout** is replayed: every `F_l` and `G_l` draws its masks on the host from a seed
//!   of (the step, `l`, which branch) ([`efficient_attn::seeded_dropout`]), not from the
//!   device's global generator, so the forward, the reconstruction and the recomputation see
//!   the same masks whatever else runs meanwhile.
//!
//! Without a tape (inference, or your own training loop) the same architecture runs as
//! ordinary tensor operations whose backward stores activations as usual; both give the same
//! gradients (`tests/it/reversible.rs`). Variants with per-forward statistics (Routing's
//! centroid sums and counts) see each layer three times per step in tape mode; their running
//! means are unchanged, as sums and counts grow alike.

use std::fmt;
use std::sync::{Arc, Mutex};

use burn::module::{Module, ModuleDisplay, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Gradients, Tensor};
use efficient_attn::{AttentionCore, DropoutSeed, Extras};

use crate::stack::Stack;

/// The backward of one recorded pass: from the gradient of the stack's output, adds the
/// parameter gradients and returns the gradient of its input.
type PassBackward = Box<dyn FnOnce(Tensor<3>, &mut GradientsParams) -> Tensor<3> + Send>;

/// One recorded pass through a reversible stack: the input (with its graph), the leaf the
/// rest of the graph continues from, and what computes the stack's gradients.
struct Entry {
    input: Tensor<3>,
    leaf: Tensor<3>,
    backward: PassBackward,
}

/// Makes a reversible stack train without storing its activations: insert a tape into the
/// input's extras ([`Extras::side`]) for a training forward on an autodiff device, call
/// `backward()` on the loss, and hand its gradients to [`gradients`](Self::gradients), which
/// completes them with the stack's (and the embeddings') gradients.
///
/// ```ignore
/// let tape = ReversibleTape::default();
/// let input = EncoderInput::new(tokens).with_side(tape.clone());
/// let loss = loss_of(model.forward(input));
/// let grads = tape.gradients(loss.backward(), &model); // GradientsParams for the optimiser
/// ```
///
/// A stack without `reversible = true` ignores the tape, and so does a forward without
/// autodiff; then [`gradients`](Self::gradients) is `GradientsParams::from_grads`.
#[derive(Clone, Default)]
pub struct ReversibleTape(Arc<Mutex<Vec<Entry>>>);

impl fmt::Debug for ReversibleTape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.lock().map(|e| e.len()).unwrap_or(0);
        write!(f, "ReversibleTape({n} passes)")
    }
}

impl ReversibleTape {
    /// Whether a forward recorded a pass that [`gradients`](Self::gradients) has not taken.
    pub fn is_empty(&self) -> bool {
        self.0.lock().map(|e| e.is_empty()).unwrap_or(true)
    }

    fn record(&self, entry: Entry) {
        self.0.lock().expect("reversible tape").push(entry);
    }

    /// The parameter gradients of `module` for the loss whose `backward()` gave `grads`,
    /// including those of the reversible stacks' recorded passes (latest first) and of the
    /// graphs their inputs came from. Takes the recorded passes.
    pub fn gradients<M: Module>(&self, mut grads: Gradients, module: &M) -> GradientsParams {
        let entries = std::mem::take(&mut *self.0.lock().expect("reversible tape"));
        if entries.is_empty() {
            return GradientsParams::from_grads(grads, module);
        }
        let mut total = GradientsParams::new();
        for entry in entries.into_iter().rev() {
            let grad_out = entry
                .leaf
                .grad_remove(&mut grads)
                .unwrap_or_else(|| entry.leaf.zeros_like().inner());
            let grad_in = (entry.backward)(grad_out, &mut total);
            if entry.input.is_tracked() {
                let mut input_grads = entry.input.mul(grad_in).sum().backward();
                accumulate(&mut total, &mut input_grads, module);
            }
        }
        accumulate(&mut total, &mut grads, module);
        total
    }
}

/// Moves every gradient of `module`'s parameters from `grads` into `total`, adding to what is
/// there (a parameter several layers share gets the sum).
pub(crate) fn accumulate<M: Module>(
    total: &mut GradientsParams,
    grads: &mut Gradients,
    module: &M,
) {
    struct Merge<'a> {
        total: &'a mut GradientsParams,
        grads: &'a mut Gradients,
    }
    impl ModuleVisitor for Merge<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if !param.is_require_grad() {
                return;
            }
            let Some(grad) = param.val().grad_remove(self.grads) else {
                return;
            };
            let sum = match self.total.remove::<D>(param.id) {
                Some(have) => have.add(grad),
                None => grad,
            };
            self.total.register::<D>(param.id, sum);
        }
    }
    module.visit(&mut Merge { total, grads });
}

/// The seed of branch `branch` (0: `F`, 1: `G`) of layer `layer` at optimiser step `step`.
fn seed(step: usize, layer: usize, branch: u64) -> u64 {
    // SplitMix64 of the packed triple.
    let mut z = (step as u64)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add((layer as u64) << 1 | branch)
        .wrapping_add(0xd1b5_4a32_d192_ed03);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Materialises every parameter of `module`: Burn initialises parameters lazily, and an
/// uninitialised parameter cloned (the untracked copy of the taped forward) would initialise
/// twice, to different values.
fn materialise<M: Module>(module: &M) {
    struct Touch;
    impl ModuleVisitor for Touch {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let _ = param.val();
        }
    }
    module.visit(&mut Touch);
}

impl<C: AttentionCore + Module + ModuleDisplay + 'static> Stack<C> {
    /// Layer `l` as a reversible block: `(x₁, x₂) → (y₁, y₂)`, with `y₁ = x₁ + F_l(x₂)` and
    /// `y₂ = x₂ + G_l(y₁)`; the dropout masks of each branch are drawn from a seed of
    /// (step, `l`, branch), the same on every call. `extras` must carry the stack's shared
    /// parameter if it has one ([`extras_with_shared`](Self::extras_with_shared)).
    ///
    /// # Shapes
    /// - x₁, x₂, y₁, y₂: `[batch, seq, d_model]`
    pub fn reversible_layer(
        &self,
        l: usize,
        (x1, x2): (Tensor<3>, Tensor<3>),
        extras: &Extras,
    ) -> (Tensor<3>, Tensor<3>) {
        let layer = &self.layers[l];
        let y1 = x1.add(layer.attention_residual(x2.clone(), &self.branch_extras(l, extras)));
        let y2 = x2.add(layer.feed_forward_residual(y1.clone(), Some(self.branch_seed(l, 1))));
        (y1, y2)
    }

    /// The inverse of [`reversible_layer`](Self::reversible_layer): `(y₁, y₂) → (x₁, x₂)`,
    /// with `x₂ = y₂ − G_l(y₁)` and `x₁ = y₁ − F_l(x₂)` under the same dropout masks.
    ///
    /// # Shapes
    /// - y₁, y₂, x₁, x₂: `[batch, seq, d_model]`
    pub fn reversible_inverse(
        &self,
        l: usize,
        (y1, y2): (Tensor<3>, Tensor<3>),
        extras: &Extras,
    ) -> (Tensor<3>, Tensor<3>) {
        let layer = &self.layers[l];
        let x2 = y2.sub(layer.feed_forward_residual(y1.clone(), Some(self.branch_seed(l, 1))));
        let x1 = y1.sub(layer.attention_residual(x2.clone(), &self.branch_extras(l, extras)));
        (x1, x2)
    }

    /// The dropout seed of branch `branch` (0: `F`, 1: `G`) of layer `l` at this step.
    fn branch_seed(&self, l: usize, branch: u64) -> u64 {
        seed(self.step(), l, branch)
    }

    /// `extras` with the attention branch's dropout seed.
    fn branch_extras(&self, l: usize, extras: &Extras) -> Extras {
        let mut extras = extras.clone();
        extras.side.insert(DropoutSeed(self.branch_seed(l, 0)));
        extras
    }

    /// The layers as reversible blocks with ordinary autodiff, output the halves' mean.
    pub(crate) fn reversible_forward(&self, x: Tensor<3>, extras: &Extras) -> Tensor<3> {
        let mut pair = (x.clone(), x);
        for l in 0..self.layers.len() {
            pair = self.reversible_layer(l, pair, extras);
        }
        pair.0.add(pair.1).div_scalar(2.0)
    }

    /// The layers as reversible blocks on untracked tensors, recorded on `tape`; returns the
    /// leaf standing for the halves' mean.
    pub(crate) fn reversible_forward_taped(
        &self,
        x: Tensor<3>,
        extras: &Extras,
        tape: &ReversibleTape,
    ) -> Tensor<3>
    where
        C: 'static,
    {
        materialise(self);
        let frozen = self.clone().no_grad();
        let frozen_extras = frozen.extras_with_shared(extras.clone());
        let detached = x.clone().detach();
        let mut pair = (detached.clone(), detached);
        for l in 0..frozen.layers.len() {
            pair = frozen.reversible_layer(l, pair, &frozen_extras);
        }
        let (y1, y2) = pair;
        let leaf = y1.clone().add(y2.clone()).div_scalar(2.0).require_grad();
        let stack = self.clone();
        let extras = self.extras_with_shared(extras.clone());
        let backward = move |grad_out: Tensor<3>, total: &mut GradientsParams| {
            stack.reversible_backward((y1, y2), grad_out, &frozen, &frozen_extras, &extras, total)
        };
        tape.record(Entry {
            input: x,
            leaf: leaf.clone(),
            backward: Box::new(backward),
        });
        leaf
    }

    /// The backward of a taped pass: from the last pair `(y₁, y₂)` and the gradient of their
    /// mean, layer by layer from the last, reconstructs the layer's input with `frozen`,
    /// recomputes the layer with autodiff and backpropagates; adds the parameter gradients to
    /// `total` and returns the gradient of the stack's input.
    fn reversible_backward(
        &self,
        (y1, y2): (Tensor<3>, Tensor<3>),
        grad_out: Tensor<3>,
        frozen: &Self,
        frozen_extras: &Extras,
        extras: &Extras,
        total: &mut GradientsParams,
    ) -> Tensor<3> {
        let device = y1.device();
        let half = grad_out.div_scalar(2.0);
        let (mut g1, mut g2) = (half.clone(), half);
        let mut pair = (y1, y2);
        for l in (0..self.layers.len()).rev() {
            let (x1, x2) = frozen.reversible_inverse(l, pair, frozen_extras);
            let (t1, t2) = (
                x1.clone().detach().require_grad(),
                x2.clone().detach().require_grad(),
            );
            let (r1, r2) = self.reversible_layer(l, (t1.clone(), t2.clone()), extras);
            let mut surrogate = r1.mul(Tensor::from_inner(g1)).sum();
            surrogate = surrogate.add(r2.mul(Tensor::from_inner(g2)).sum());
            if let Some(aux) = self.layer_aux_loss(l, &device) {
                surrogate = surrogate.add(aux);
            }
            let mut grads = surrogate.backward();
            g1 = t1
                .grad_remove(&mut grads)
                .unwrap_or_else(|| t1.zeros_like().inner());
            g2 = t2
                .grad_remove(&mut grads)
                .unwrap_or_else(|| t2.zeros_like().inner());
            accumulate(total, &mut grads, self);
            pair = (x1, x2);
        }
        g1.add(g2)
    }
}
