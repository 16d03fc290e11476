//! The long-document recipe below the CLI: a converted pretrained encoder learns on a fixed
//! batch (one optimiser step lowers the loss).

use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use efficient_attn::{AttentionConfig, PerformerAttentionConfig};
use models::{BertCheckpoint, ClassifierConfig, Pooling, convert};
use train::data::loader::ClassBatch;
use train::tasks::{ClassifierWithLoss, NanGuard};

use crate::workspace;

#[test]
fn one_step_lowers_the_loss_of_a_converted_encoder_on_a_fixed_batch() {
    let dir = workspace().join("../shared/pretrained/all-MiniLM-L6-v2");
    if !dir.join("model.safetensors").is_file() {
        assert!(
            std::env::var_os("EFFORMER_REQUIRE_SHARED").is_none(),
            "{} missing",
            dir.display()
        );
        efficient_attn::testing::skipped(
            "one_step_lowers_the_loss_of_a_converted_encoder_on_a_fixed_batch",
            &format!("{} not found", dir.display()),
        );
        return;
    }
    let device = Device::flex().autodiff();
    let ckpt = BertCheckpoint::open(&dir).unwrap();
    let mut target = ckpt.encoder_config(PerformerAttentionConfig::default().into());
    target.embedding.max_len = 1024;
    target.stack.dropout = 0.0;
    target.embedding.dropout = 0.0;
    let (encoder, _) = convert(
        ckpt.load(&device).unwrap(),
        &ckpt.encoder_config(AttentionConfig::default()),
        &target,
        &device,
    )
    .unwrap();
    let mut model = ClassifierConfig {
        encoder: target,
        n_classes: 2,
        pooling: Pooling::Mean,
        dropout: 0.0,
    }
    .init_sequence(&device)
    .unwrap();
    model.encoder = encoder;
    let mut task = ClassifierWithLoss::new(model, 0, None, NanGuard::default());

    // "This is an example sentence." and a second sentence, twice, with opposite labels.
    let rows: [[i64; 8]; 4] = [
        [101, 2023, 2003, 2019, 2742, 6251, 1012, 102],
        [101, 8114, 19081, 5547, 1996, 17718, 23671, 102],
        [101, 2023, 2003, 2019, 2742, 6251, 1012, 102],
        [101, 8114, 19081, 5547, 1996, 17718, 23671, 102],
    ];
    let batch = || ClassBatch {
        tokens: Tensor::<2, Int>::from_data(TensorData::new(rows.concat(), [4, 8]), &device),
        mask_pad: Tensor::<2, Int>::zeros([4, 8], &device).equal_elem(1),
        labels: Tensor::from_data(TensorData::new(vec![0i64, 1, 0, 1], [4]), &device),
    };
    let before = task.forward(batch()).loss;
    let grads = GradientsParams::from_grads(before.backward(), &task);
    let before = before.into_scalar::<f32>();
    let mut optim = AdamConfig::new().init();
    task = optim.step(1e-4, task, grads);
    let after = task.forward(batch()).loss.into_scalar::<f32>();
    assert!(after < before, "loss {before} -> {after} after one step");
}
