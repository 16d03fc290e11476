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
//!   gradient, for each layer from the last (RevNet's Algorithm 1): `G_l` runs tracked on a
//!   copy of `y₁`, giving `x₂ = y₂ − G_l(y₁)` and, backpropagated with `ĝ₂`, the gradient
//!   through `G_l`; then `F_l` runs tracked on a copy of `x₂`, giving `x₁ = y₁ − F_l(x₂)` and,
//!   backpropagated with `ĝ₁` (plus the layer's auxiliary loss), the gradient through `F_l`.
//!   The reconstruction is the recomputation: each branch runs once in the backward, so a
//!   layer costs one more forward pass than with stored activations. Finally `x`'s own graph
//!   (the embeddings) is backpropagated with `ĝ₁ + ĝ₂`; a pass whose input came from an
//!   earlier taped pass (a stack applied twice) hands that pass its output gradient.
//!   Activation memory is one layer's, whatever the depth. The input must not reach the loss
//!   by another path (Burn's graphs are backpropagated once).
//! - **Dropout** is replayed: every `F_l` and `G_l` draws its masks on the host from a seed
//!   of (the pass's nonce, the step, `l`, which branch) ([`efficient_attn::seeded_dropout`]),
//!   not from the device's global generator, so the forward and the backward see the same
//!   masks whatever else runs meanwhile. The nonce is drawn from the device's generator once
//!   per pass (so the run's seed, every pass and every replica count), or taken from a
//!   [`DropoutSeed`] in the extras.
//!
//! One tape serves the passes of one forward on one device (each training step makes its
//! own).
//!
//! Without a tape (inference, or your own training loop) the same architecture runs as
//! ordinary tensor operations whose backward stores activations as usual; both give the same
//! gradients (`tests/it/reversible.rs`). Variants with per-forward statistics (Routing's
//! centroid sums and counts) see each layer twice per step in tape mode; their running means
//! are unchanged, as sums and counts grow alike.

use std::fmt;
use std::sync::{Arc, Mutex};

use burn::module::{Module, ModuleDisplay, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Distribution, Gradients, Tensor};
use efficient_attn::{AttentionCore, DropoutSeed, Extras, mix_seed};

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
        // Gradients an earlier pass's output receives through a later pass's input (chained
        // stacks), collected while the later pass is backpropagated.
        let leaves: Vec<Tensor<3>> = entries.iter().map(|e| e.leaf.clone()).collect();
        let mut through: Vec<Option<Tensor<3>>> = vec![None; entries.len()];
        for (i, entry) in entries.into_iter().enumerate().rev() {
            let grad_out = add_opt(entry.leaf.grad_remove(&mut grads), through[i].take())
                .unwrap_or_else(|| entry.leaf.zeros_like().inner());
            let grad_in = (entry.backward)(grad_out, &mut total);
            if entry.input.is_tracked() {
                let mut input_grads = entry.input.mul(grad_in).sum().backward();
                for (j, leaf) in leaves[..i].iter().enumerate() {
                    through[j] = add_opt(through[j].take(), leaf.grad_remove(&mut input_grads));
                }
                accumulate(&mut total, &mut input_grads, module);
            }
        }
        accumulate(&mut total, &mut grads, module);
        total
    }
}

/// The sum of two optional gradients.
fn add_opt(a: Option<Tensor<3>>, b: Option<Tensor<3>>) -> Option<Tensor<3>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.add(b)),
        (a, b) => a.or(b),
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

/// The seed of branch `branch` (0: `F`, 1: `G`) of layer `layer` at optimiser step `step` in
/// the pass whose nonce is `pass`.
fn seed(pass: u64, step: usize, layer: usize, branch: u64) -> u64 {
    mix_seed(mix_seed(pass, step as u64), (layer as u64) << 1 | branch)
}

/// A nonce for one pass through a stack: the extras' [`DropoutSeed`] if given (tests, replay),
/// else drawn from the device's generator (so the run's seed and every pass, replica and step
/// get their own dropout masks) on autodiff devices, else 0 (no dropout runs).
fn pass_nonce(extras: &Extras, x: &Tensor<3>) -> u64 {
    if let Some(DropoutSeed(seed)) = extras.side.get::<DropoutSeed>() {
        return *seed;
    }
    let device = x.device();
    if !device.is_autodiff() {
        return 0;
    }
    let bits: Vec<f32> = Tensor::<1>::random([2], Distribution::Uniform(0.0, 1.0), &device)
        .into_data()
        .try_to_vec::<f32>()
        .unwrap_or_default();
    bits.iter()
        .fold(0u64, |acc, b| (acc << 32) | u64::from(b.to_bits()))
}

/// Materialises every parameter of `module` before the taped forward's `clone().no_grad()`:
/// Burn initialises parameters lazily and clones share that state, so `no_grad` on a clone of
/// a still-lazy parameter would mark the model's own parameter as not requiring a gradient.
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
    /// (the pass nonce `extras` carries as a [`DropoutSeed`], the step, `l`, branch), the same
    /// on every call. `extras` must carry the stack's shared parameter if it has one
    /// ([`extras_with_shared`](Self::extras_with_shared)).
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
        let g_seed = self.branch_seed(l, 1, extras);
        let y2 = x2.add(layer.feed_forward_residual(y1.clone(), Some(g_seed)));
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
        let g_seed = self.branch_seed(l, 1, extras);
        let x2 = y2.sub(layer.feed_forward_residual(y1.clone(), Some(g_seed)));
        let x1 = y1.sub(layer.attention_residual(x2.clone(), &self.branch_extras(l, extras)));
        (x1, x2)
    }

    /// The dropout seed of branch `branch` (0: `F`, 1: `G`) of layer `l` at this step, in the
    /// pass whose nonce `extras` carries as a [`DropoutSeed`] (0 if none).
    fn branch_seed(&self, l: usize, branch: u64, extras: &Extras) -> u64 {
        let pass = extras.side.get::<DropoutSeed>().map_or(0, |s| s.0);
        seed(pass, self.step(), l, branch)
    }

    /// `extras` with the attention branch's dropout seed.
    fn branch_extras(&self, l: usize, extras: &Extras) -> Extras {
        let mut branch = extras.clone();
        branch
            .side
            .insert(DropoutSeed(self.branch_seed(l, 0, extras)));
        branch
    }

    /// The layers as reversible blocks with ordinary autodiff, output the halves' mean.
    pub(crate) fn reversible_forward(&self, x: Tensor<3>, extras: &Extras) -> Tensor<3> {
        let mut extras = extras.clone();
        extras.side.insert(DropoutSeed(pass_nonce(&extras, &x)));
        let extras = &extras;
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
        // The pass's extras without the tape (the backward closure, which the tape holds,
        // keeps them: a tape inside would be a reference cycle) and with its dropout nonce.
        let mut extras = extras.clone();
        extras.side.remove::<ReversibleTape>();
        extras.side.insert(DropoutSeed(pass_nonce(&extras, &x)));
        let frozen = self.clone().no_grad();
        let frozen_extras = frozen.extras_with_shared(extras.clone());
        let detached = x.clone().detach();
        let mut pair = (detached.clone(), detached);
        for l in 0..frozen.layers.len() {
            pair = frozen.reversible_layer(l, pair, &frozen_extras);
        }
        drop(frozen_extras);
        drop(frozen);
        let (y1, y2) = pair;
        let leaf = y1.clone().add(y2.clone()).div_scalar(2.0).require_grad();
        let stack = self.clone();
        let extras = self.extras_with_shared(extras);
        let backward = move |grad_out: Tensor<3>, total: &mut GradientsParams| {
            stack.reversible_backward((y1, y2), grad_out, &extras, total)
        };
        tape.record(Entry {
            input: x,
            leaf: leaf.clone(),
            backward: Box::new(backward),
        });
        leaf
    }

    /// The backward of a taped pass (RevNet's, Gomez et al. 2017, Algorithm 1): from the last
    /// pair `(y₁, y₂)` and the gradient of their mean, layer by layer from the last: `G` runs
    /// tracked on `y₁`, which gives `x₂ = y₂ − G(y₁)` and, backpropagated with `ĝ₂`, the
    /// gradient through `G`; then `F` runs tracked on `x₂`, which gives `x₁ = y₁ − F(x₂)` and,
    /// backpropagated with `ĝ₁` (plus the layer's auxiliary loss), the gradient through `F`.
    /// Each branch runs once: the reconstruction is the recomputation. Adds the parameter
    /// gradients to `total` and returns the gradient of the stack's input.
    fn reversible_backward(
        &self,
        (y1, y2): (Tensor<3>, Tensor<3>),
        grad_out: Tensor<3>,
        extras: &Extras,
        total: &mut GradientsParams,
    ) -> Tensor<3> {
        let device = y1.device();
        let grad_of = |t: &Tensor<3>, grads: &mut Gradients| {
            t.grad_remove(grads)
                .unwrap_or_else(|| t.zeros_like().inner())
        };
        let half = grad_out.div_scalar(2.0);
        let (mut g1, mut g2) = (half.clone(), half);
        let mut pair = (y1, y2);
        for l in (0..self.layers.len()).rev() {
            let layer = &self.layers[l];
            let (y1, y2) = pair;
            // y₂ = x₂ + G(y₁).
            let y1_leaf = y1.clone().detach().require_grad();
            let g_out =
                layer.feed_forward_residual(y1_leaf.clone(), Some(self.branch_seed(l, 1, extras)));
            let x2 = y2.sub(g_out.clone().detach());
            let mut grads = g_out.mul(Tensor::from_inner(g2.clone())).sum().backward();
            g1 = g1.add(grad_of(&y1_leaf, &mut grads));
            accumulate(total, &mut grads, self);
            // y₁ = x₁ + F(x₂).
            let x2_leaf = x2.clone().detach().require_grad();
            let f_out = layer.attention_residual(x2_leaf.clone(), &self.branch_extras(l, extras));
            let x1 = y1.sub(f_out.clone().detach());
            let mut surrogate = f_out.mul(Tensor::from_inner(g1.clone())).sum();
            if let Some(aux) = self.layer_aux_loss(l, &device) {
                surrogate = surrogate.add(aux);
            }
            let mut grads = surrogate.backward();
            g2 = g2.add(grad_of(&x2_leaf, &mut grads));
            accumulate(total, &mut grads, self);
            pair = (x1.detach(), x2.detach());
        }
        g1.add(g2)
    }
}
