//! Generates the bindings against the DPDK that pkg-config finds (Debian 12: 22.11) and
//! compiles the C shim with the same flags. Fails with the install hint if DPDK's development
//! files or libclang are missing.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=wrapper.h");
    println!("cargo:rerun-if-changed=shim.h");
    println!("cargo:rerun-if-changed=shim.c");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");

    let dpdk = pkg_config::Config::new()
        .atleast_version("22.11")
        .probe("libdpdk")
        .unwrap_or_else(|e| {
            panic!("DPDK development files not found ({e}); install them: apt-get install libdpdk-dev pkg-config")
        });
    // Flags pkg-config gives beyond include paths (`-include rte_config.h`, `-march=…`): both
    // the shim and bindgen must see the same configuration as DPDK itself.
    let extra: Vec<String> = std::process::Command::new("pkg-config")
        .args(["--cflags-only-other", "libdpdk"])
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    let mut other = Vec::new();
    let mut it = extra.iter();
    while let Some(f) = it.next() {
        if f == "-include" {
            if let Some(h) = it.next() {
                other.push(format!("-include{h}"));
            }
        } else {
            other.push(f.clone());
        }
    }

    let mut cc = cc::Build::new();
    cc.file("shim.c").opt_level(3);
    for p in &dpdk.include_paths {
        cc.include(p);
    }
    for f in &other {
        cc.flag(f);
    }
    cc.compile("torii_dpdk_shim");

    let mut b = bindgen::Builder::default()
        .header("wrapper.h")
        .clang_arg("-I.")
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        .allowlist_function("rte_(eal|dev|eth|pktmbuf|mempool|lcore|socket|thread|strerror|exit|log|zmalloc|free|malloc).*")
        .allowlist_function("torii_.*")
        .allowlist_var("TORII_.*")
        .allowlist_type("rte_(mbuf|eth_.*|mempool|ether_addr|mbuf_ext_shared_info)")
        .blocklist_function("rte_eth_(rx|tx)_burst")
        .derive_default(true)
        .layout_tests(true)
        .generate_comments(false)
        .prepend_enum_name(false);
    for p in &dpdk.include_paths {
        b = b.clang_arg(format!("-I{}", p.display()));
    }
    for f in &other {
        b = b.clang_arg(f);
    }
    let bindings = b.generate().unwrap_or_else(|e| {
        panic!("bindgen failed on DPDK's headers ({e}); it needs libclang: apt-get install libclang-dev")
    });
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("writing the bindings");
}
