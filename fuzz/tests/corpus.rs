// SPDX-License-Identifier: Apache-2.0
//! Replays every input in `fuzz/corpus/<target>/` (the committed seeds and
//! whatever fuzzing added) and every target's seeds through the targets'
//! own input handlers: the fuzz targets as an ordinary test, for a
//! toolchain that cannot build libFuzzer's instrumentation.

use std::path::Path;

use vhost_rng_fuzz::TARGETS;

#[test]
fn every_corpus_input_runs_without_a_panic() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for target in TARGETS {
        let mut inputs = 0;
        for (_, bytes) in (target.seeds)() {
            (target.run)(&bytes);
            inputs += 1;
        }
        let dir = corpus.join(target.name);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            let bytes = std::fs::read(&path).expect("a corpus file");
            (target.run)(&bytes);
            inputs += 1;
        }
        println!("{}: {inputs} inputs", target.name);
    }
}
