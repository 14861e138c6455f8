//! The safe wrapper end to end on tiny random models.
use libperl::*;
use std::path::PathBuf;

fn tiny_config() -> ModelConfig {
    ModelConfig {
        dim: 32,
        hidden_dim: 64,
        n_layers: 1,
        n_heads: 2,
        n_kv_heads: 1,
        vocab_size: 40,
        max_seq_len: 32,
        ..Default::default()
    }
}

fn tiny() -> Model {
    Model::random(&tiny_config(), 1).expect("random model")
}

struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("libperl-rs-{}-{}", tag, std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn version_and_threads() {
    assert_eq!(version(), "0.1.0");
    assert_eq!(version_number(), 100);
    set_num_threads(1).unwrap();
    assert_eq!(num_threads(), 1);
}

#[test]
fn errors_carry_status_and_message() {
    let e = Model::load("/no/such/model").unwrap_err();
    assert_eq!(e.status(), Status::IO);
    assert_eq!(e.status().name(), "LIBPERL_ERR_IO");
    assert!(e.message().contains("/no/such/model"), "{}", e.message());
    assert!(e.to_string().contains("perl_model_load"));

    let model = tiny();
    let bad = [1, 2, 999];
    let e = model.forward(None, &Batch::new(&bad, 1, 3).unwrap()).unwrap_err();
    assert_eq!(e.status(), Status::RANGE);
    assert!(Batch::new(&bad, 2, 3).is_err()); // checked on the Rust side
    let e = Lora::new(&model, &LoraOptions { rank: 0, ..Default::default() }).unwrap_err();
    assert_eq!(e.status(), Status::INVALID_ARGUMENT);
}

#[test]
fn forward_and_adapter_params() {
    let model = tiny();
    assert_eq!(model.config().vocab_size, 40);
    let toks = [1, 2, 3, 4, 5, 0];
    let lens = [3, 2];
    let batch = Batch::new(&toks, 2, 3).unwrap().with_lengths(&lens).unwrap();
    let base = model.forward(None, &batch).unwrap();
    assert_eq!(base.len(), 2 * 3 * 40);
    assert!(base[(3 + 2) * 40..].iter().all(|&v| v == 0.0)); // padding

    let mut lora = Lora::new(&model, &LoraOptions { rank: 2, target_modules: target::ALL, ..Default::default() }).unwrap();
    assert_eq!(model.forward(Some(&lora), &batch).unwrap(), base); // B = 0
    let n = lora.num_params();
    assert_eq!(lora.params().len(), n);
    for (i, p) in lora.params_mut().iter_mut().enumerate() {
        *p = 0.01 * ((i % 11) as f32 - 5.0);
    }
    assert_ne!(model.forward(Some(&lora), &batch).unwrap(), base);
    let lp = model.token_logprobs(Some(&lora), &batch).unwrap();
    assert_eq!(lp.len(), 6);
}

#[test]
fn sft_save_load_merge_state() {
    let model = tiny();
    let dir = TempDir::new("sft");
    let mut lora = Lora::new(&model, &LoraOptions { rank: 4, use_rslora: 1, ..Default::default() }).unwrap();
    lora.set_optimizer(&OptimOptions { lr: 1e-2, ..Default::default() }).unwrap();
    let rows = Padded::new(&[vec![1, 5, 6, 7, 8], vec![1, 5, 6]]);
    let batch = rows.batch().unwrap();
    let first = lora.sft_step(&batch, None).unwrap();
    let mut last = first;
    for _ in 0..10 {
        last = lora.sft_step(&batch, None).unwrap();
    }
    assert!(last.loss < first.loss);
    assert_eq!(last.step, 11);
    assert!(lora.grads().iter().any(|&g| g != 0.0));

    let want = model.forward(Some(&lora), &batch).unwrap();
    lora.save(dir.0.join("adapter")).unwrap();
    let again = Lora::load(&model, dir.0.join("adapter")).unwrap();
    assert_eq!(again.params(), lora.params());
    assert_eq!(model.forward(Some(&again), &batch).unwrap(), want);
    let merged = lora.merge().unwrap();
    let got = merged.forward(None, &batch).unwrap();
    assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-4));

    lora.save_state(dir.0.join("state.bin")).unwrap();
    let mut resumed = Lora::new(&model, &LoraOptions { rank: 4, use_rslora: 1, seed: 9, ..Default::default() }).unwrap();
    resumed.load_state(dir.0.join("state.bin")).unwrap();
    assert_eq!(resumed.sft_step(&batch, None).unwrap(), lora.sft_step(&batch, None).unwrap());
    assert_eq!(resumed.params(), lora.params());
}

#[test]
fn grad_hook_can_edit_and_abort() {
    let model = tiny();
    let mut lora = Lora::new(&model, &LoraOptions { rank: 2, ..Default::default() }).unwrap();
    lora.set_optimizer(&OptimOptions { lr: 1e-2, ..Default::default() }).unwrap();
    let toks = [1, 2, 3, 4];
    let batch = Batch::new(&toks, 1, 4).unwrap();
    let mut calls = 0usize;
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let s2 = seen.clone();
    lora.set_grad_hook(move |g: &mut [f32]| {
        s2.store(g.len(), std::sync::atomic::Ordering::SeqCst);
        g.iter_mut().for_each(|x| *x = 0.0);
        true
    })
    .unwrap();
    let before = lora.params().to_vec();
    lora.sft_step(&batch, None).unwrap();
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), lora.num_params());
    assert_eq!(lora.params(), &before[..]); // zero gradient, zero update

    lora.set_grad_hook(|_: &mut [f32]| false).unwrap();
    assert_eq!(lora.sft_step(&batch, None).unwrap_err().status(), Status::CALLBACK);
    lora.set_grad_hook(|_: &mut [f32]| panic!("a panicking hook must not unwind into C")).unwrap();
    assert_eq!(lora.sft_step(&batch, None).unwrap_err().status(), Status::CALLBACK);
    lora.clear_grad_hook().unwrap();
    lora.sft_step(&batch, None).unwrap();
    calls += 1;
    assert_eq!(calls, 1);
}

#[test]
fn reward_model_pairwise_pointwise_load() {
    let model = tiny();
    let dir = TempDir::new("reward");
    let mut lora = Lora::new(&model, &LoraOptions { rank: 4, target_modules: target::ALL, ..Default::default() }).unwrap();
    lora.set_optimizer(&OptimOptions { lr: 1e-2, ..Default::default() }).unwrap();
    let chosen = Padded::new(&[vec![1, 3, 4, 5], vec![1, 6, 7]]);
    let rejected = Padded::new(&[vec![1, 30, 31, 32], vec![1, 33, 34]]);
    let (cb, rb) = (chosen.batch().unwrap(), rejected.batch().unwrap());
    let mut reward = Reward::new(&model, &mut lora, &RewardOptions::default()).unwrap();
    let first = reward.step_pairwise(&cb, &rb, None).unwrap();
    let mut last = first.clone();
    for _ in 0..20 {
        last = reward.step_pairwise(&cb, &rb, Some(&[0.0, 0.0])).unwrap();
    }
    assert!(last.stats.loss < first.stats.loss);
    let (c, r) = (reward.score(&cb).unwrap(), reward.score(&rb).unwrap());
    assert!(c.iter().zip(&r).all(|(a, b)| a > b));
    reward.save(dir.0.join("rm")).unwrap();
    drop(reward);
    assert!(lora.num_params() > 0); // usable again once the reward model is gone

    let mut loaded = Reward::load(&model, dir.0.join("rm"), &RewardOptions::default()).unwrap();
    let again = loaded.score(&cb).unwrap();
    assert!(again.iter().zip(&c).all(|(a, b)| (a - b).abs() < 1e-5));
    assert_eq!(loaded.lora().num_params(), lora.num_params());

    let mut point_lora = Lora::new(&model, &LoraOptions { rank: 2, ..Default::default() }).unwrap();
    let mut pointwise =
        Reward::new(&model, &mut point_lora, &RewardOptions { objective: LIBPERL_REWARD_POINTWISE, ..Default::default() })
            .unwrap();
    let (stats, scores) = pointwise.step_pointwise(&cb, &[1.0, 0.0]).unwrap();
    assert_eq!((stats.step, scores.len()), (1, 2));
    assert_eq!(pointwise.step_pointwise(&cb, &[1.0, 0.5]).unwrap_err().status(), Status::INVALID_ARGUMENT);
}

#[test]
fn generate_and_policy_steps() {
    let model = tiny();
    let dir = TempDir::new("policy");
    let prompts = Padded::new(&[vec![1, 2, 3], vec![1, 2, 3], vec![1, 5], vec![1, 5]]);
    let pb = prompts.batch().unwrap();
    let g = model
        .generate(None, &pb, &GenerateOptions { max_new_tokens: 4, temperature: 0.0, ..Default::default() }, &[])
        .unwrap();
    assert_eq!(g.tokens.len(), 16);
    assert!(g.lengths.iter().all(|&n| (1..=4).contains(&n)));
    assert_eq!(g.response(0).len(), g.lengths[0] as usize);

    let mut policy = Lora::new(&model, &LoraOptions { rank: 2, ..Default::default() }).unwrap();
    policy.set_optimizer(&OptimOptions { lr: 1e-2, ..Default::default() }).unwrap();
    let before = policy.params().to_vec();
    let opts = PolicyOptions { algorithm: algorithm::RLOO, group_size: 2, loss_norm: LIBPERL_NORM_SEQUENCE, ..Default::default() };
    let mut trainer = PolicyTrainer::new(&model, &mut policy, None, &opts).unwrap();
    let g = model
        .generate(Some(trainer.policy()), &pb, &GenerateOptions { max_new_tokens: 4, seed: 3, ..Default::default() }, &[])
        .unwrap();
    let rewards: Vec<f32> = (0..4).map(|r| g.response(r).iter().sum::<i32>() as f32 / 10.0).collect();
    let stats = trainer.step(&pb, &Rollout::from_generation(&g, &rewards)).unwrap();
    assert_eq!(stats.step, 1);
    trainer.save(dir.0.join("ckpt")).unwrap();
    trainer.load(dir.0.join("ckpt")).unwrap();
    let bad = [1.0f32, f32::NAN, 0.0, 0.0];
    let e = trainer.step(&pb, &Rollout::from_generation(&g, &bad)).unwrap_err();
    assert_eq!(e.status(), Status::NUMERIC);
    drop(trainer);
    assert_ne!(policy.params(), &before[..]);
}
