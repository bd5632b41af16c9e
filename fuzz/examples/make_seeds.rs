//! Writes well-formed starting inputs for the `descriptor_chains` target (rings laid out by the
//! test driver, see `testing::fuzz_seed`) into the directory given as first argument.

use std::path::PathBuf;

use torii_vhost_user_net::testing::{fuzz_seed, XorShift};

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "corpus/descriptor_chains".into()),
    );
    std::fs::create_dir_all(&dir)?;
    let mut rng = XorShift::new(0x5eed);
    for i in 0..32 {
        std::fs::write(dir.join(format!("seed-{i:02}")), fuzz_seed(&mut rng))?;
    }
    Ok(())
}
