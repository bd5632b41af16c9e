//! Writes the well-formed starting inputs of the generated targets into `seeds/<target>/` under
//! the directory given as first argument (default: this crate's folder): rings laid out by the
//! net test driver, real frontends' vhost-user message orders, CNI invocations of every mode,
//! agent frames of every method. `daemon_config`'s seeds are configuration files kept as they
//! are. Run by `scripts/fuzz --make-seeds`; the seeds are committed, so a fuzzing run starts
//! from them without building this.

use std::path::{Path, PathBuf};

use torii_vhost_user_net::testing::{fuzz_seed, XorShift};

fn write_all(root: &Path, target: &str, seeds: &[Vec<u8>]) -> std::io::Result<()> {
    let dir = root.join("seeds").join(target);
    // Old generated seeds go: a seed the generator no longer makes must not linger.
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    for (i, s) in seeds.iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i:03}")), s)?;
    }
    println!("{target}: {} seeds", seeds.len());
    Ok(())
}

fn main() -> std::io::Result<()> {
    let root = std::env::args()
        .nth(1)
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    let mut rng = XorShift::new(0x5eed);
    let net: Vec<Vec<u8>> = (0..32).map(|_| fuzz_seed(&mut rng)).collect();
    write_all(&root, "net_descriptor_chains", &net)?;
    write_all(
        &root,
        "vhost_user_messages",
        &torii_vhost_user::fuzzing::fuzz_seeds(),
    )?;
    write_all(&root, "cni_input", &torii_cni::fuzzing::fuzz_seeds())?;
    write_all(&root, "agent_frames", &torii_agent::fuzzing::fuzz_seeds())?;
    Ok(())
}
