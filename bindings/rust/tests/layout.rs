//! The #[repr(C)] structs must match the header: each *_init writes sizeof(C struct)
//! into struct_size, which must equal Rust's size_of; spot-check a few offsets too.
use libperl::sys;
use std::mem::{size_of, MaybeUninit};

macro_rules! check_size {
    ($ty:ty, $init:ident) => {{
        let mut s = MaybeUninit::<$ty>::zeroed();
        let s = unsafe {
            sys::$init(s.as_mut_ptr());
            s.assume_init()
        };
        assert_eq!(s.struct_size, size_of::<$ty>(), "{}", stringify!($ty));
    }};
}

#[test]
fn struct_sizes_match_the_library() {
    check_size!(sys::perl_model_config, perl_model_config_init);
    check_size!(sys::perl_batch, perl_batch_init);
    check_size!(sys::perl_lora_options, perl_lora_options_init);
    check_size!(sys::perl_optim_options, perl_optim_options_init);
    check_size!(sys::perl_step_stats, perl_step_stats_init);
    check_size!(sys::perl_generate_options, perl_generate_options_init);
    check_size!(sys::perl_reward_options, perl_reward_options_init);
    check_size!(sys::perl_reward_stats, perl_reward_stats_init);
    check_size!(sys::perl_policy_options, perl_policy_options_init);
    check_size!(sys::perl_policy_stats, perl_policy_stats_init);
}

#[test]
fn defaults_match_the_header() {
    let l = libperl::LoraOptions::default();
    assert_eq!((l.rank, l.alpha, l.target_modules), (8, 16.0, libperl::target::ATTENTION));
    let p = libperl::PolicyOptions::default();
    assert_eq!(p.algorithm, libperl::algorithm::REINFORCE);
    assert!((p.lambda - 0.95).abs() < 1e-6 && (p.value_coef - 0.5).abs() < 1e-6);
    let o = libperl::OptimOptions::default();
    assert!((o.beta2 - 0.999).abs() < 1e-6 && o.max_grad_norm == 1.0);
    let g = libperl::GenerateOptions::default();
    assert_eq!(g.max_new_tokens, 64);
}

#[test]
fn every_header_function_is_declared() {
    // The header's LIBPERL_API names must all appear in src/sys.rs.
    let header = include_str!("../../../include/libperl/libperl.h");
    let sys_rs = include_str!("../src/sys.rs");
    let mut n = 0;
    for line in header.lines() {
        let Some(rest) = line.trim_start().strip_prefix("LIBPERL_API") else { continue };
        let Some(paren) = rest.find('(') else { continue };
        let name = rest[..paren].rsplit(|c: char| !(c.is_alphanumeric() || c == '_')).next().unwrap();
        if name.is_empty() || name == "LIBPERL_API" {
            continue;
        }
        n += 1;
        assert!(sys_rs.contains(&format!("pub fn {name}(")), "{name} is not declared in src/sys.rs");
    }
    assert!(n > 40, "only {n} functions found in the header");
}
