//! Reward model, then RL, on a small random Llama: `cargo run --example train`.
use libperl::*;

fn lcg(state: &mut u64) -> u32 {
    *state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (*state >> 33) as u32
}

const VOCAB: i32 = 64;

fn main() -> Result<()> {
    set_num_threads(2)?;
    let model = Model::random(
        &ModelConfig { dim: 64, hidden_dim: 128, n_layers: 2, n_heads: 4, n_kv_heads: 2, vocab_size: VOCAB, max_seq_len: 64, ..Default::default() },
        0,
    )?;
    println!("libperl {}: {:?}", version(), model);
    let mut rng = 42u64;

    // 1. A reward model that prefers responses of low token ids.
    let mut rm_lora = Lora::new(&model, &LoraOptions { rank: 8, target_modules: target::ALL, ..Default::default() })?;
    rm_lora.set_optimizer(&OptimOptions { lr: 3e-3, ..Default::default() })?;
    let mut reward = Reward::new(&model, &mut rm_lora, &RewardOptions::default())?;
    for step in 1..=30 {
        let (mut chosen, mut rejected) = (Vec::new(), Vec::new());
        for _ in 0..8 {
            let prompt: Vec<i32> = std::iter::once(1).chain((0..3).map(|_| 3 + (lcg(&mut rng) % 61) as i32)).collect();
            let low: Vec<i32> = (0..6).map(|_| 3 + (lcg(&mut rng) % 29) as i32).collect();
            let high: Vec<i32> = (0..6).map(|_| 32 + (lcg(&mut rng) % 32) as i32).collect();
            chosen.push([prompt.clone(), low].concat());
            rejected.push([prompt, high].concat());
        }
        let (c, r) = (Padded::new(&chosen), Padded::new(&rejected));
        let out = reward.step_pairwise(&c.batch()?, &r.batch()?, None)?;
        if step == 1 || step % 10 == 0 {
            println!("rm step {step:3}  loss {:.4}  accuracy {:.2}", out.stats.loss, out.stats.accuracy);
        }
    }

    // 2. RLOO on a policy adapter, scored by the reward model.
    let group = 4usize;
    let mut policy = Lora::new(&model, &LoraOptions { rank: 4, seed: 3, ..Default::default() })?;
    policy.set_optimizer(&OptimOptions { lr: 1e-2, ..Default::default() })?;
    let opts = PolicyOptions { algorithm: algorithm::RLOO, group_size: group as i32, kl_coef: 0.02, loss_norm: LIBPERL_NORM_SEQUENCE, ..Default::default() };
    let mut trainer = PolicyTrainer::new(&model, &mut policy, None, &opts)?;
    for step in 1..=5u64 {
        let mut rows = Vec::new();
        for _ in 0..2 {
            let p: Vec<i32> = std::iter::once(1).chain((0..3).map(|_| 3 + (lcg(&mut rng) % 61) as i32)).collect();
            rows.extend(std::iter::repeat(p).take(group));
        }
        let prompts = Padded::new(&rows);
        let pb = prompts.batch()?;
        let g = model.generate(Some(trainer.policy()), &pb, &GenerateOptions { max_new_tokens: 6, seed: step, ..Default::default() }, &[])?;
        let full: Vec<Vec<i32>> = (0..rows.len()).map(|r| [rows[r].as_slice(), g.response(r)].concat()).collect();
        let scored = Padded::new(&full);
        let rewards = reward.score(&scored.batch()?)?;
        let s = trainer.step(&pb, &Rollout::from_generation(&g, &rewards))?;
        println!("rl step {step:3}  reward {:+.3}  kl {:.4}  loss {:+.4}", s.mean_reward, s.kl, s.loss);
    }
    Ok(())
}
