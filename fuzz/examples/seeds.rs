// SPDX-License-Identifier: Apache-2.0
//! Writes each target's seed inputs into `fuzz/corpus/<target>/`, one file
//! a seed, named after it: `cargo run --example seeds` in `fuzz/`. What it
//! writes is committed; fuzzing adds its finds beside them (not committed).

use std::path::Path;

fn main() -> std::io::Result<()> {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for target in vhost_rng_fuzz::TARGETS {
        let dir = corpus.join(target.name);
        std::fs::create_dir_all(&dir)?;
        for (name, bytes) in (target.seeds)() {
            std::fs::write(dir.join(format!("seed-{name}")), bytes)?;
        }
    }
    Ok(())
}
