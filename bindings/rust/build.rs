//! Links libperlrl (the C library; its pkg-config name is `libperl`).
//!
//! The directory holding libperlrl.so is taken from, in order:
//!   1. $LIBPERL_LIB_DIR;
//!   2. ../../build relative to this crate (the repository's `make` output).
//! An rpath to that directory is added to the tests, examples and binaries,
//! so they run without LD_LIBRARY_PATH.  With neither present the linker's
//! default search path is used (an installed libperlrl).
use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBPERL_LIB_DIR");
    println!("cargo:rerun-if-changed=build.rs");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let dir = match env::var_os("LIBPERL_LIB_DIR") {
        Some(d) if !d.is_empty() => Some(PathBuf::from(d)),
        _ => {
            let d = manifest.join("..").join("..").join("build");
            if d.join("libperlrl.so").exists() || d.join("libperlrl.so.0").exists() {
                Some(d)
            } else {
                None
            }
        }
    };
    if let Some(d) = dir {
        let d = d.canonicalize().unwrap_or(d);
        println!("cargo:rerun-if-changed={}", d.join("libperlrl.so").display());
        println!("cargo:rustc-link-search=native={}", d.display());
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", d.display());
        println!("cargo:lib_dir={}", d.display());
    }
    println!("cargo:rustc-link-lib=dylib=perlrl");
}
