//! The generated code under `src/gen/` is committed so that a build needs no `protoc`. This test
//! regenerates it from `proto/` with `tonic-prost-build` and fails if the committed copy drifted.
//! It needs `protoc` (`apt-get install -y protobuf-compiler`). To refresh the committed copy after
//! editing a `.proto`: `PLINTH_REGEN=1 cargo test -p plinth-api --test codegen`.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

/// (proto file, the file prost names its output after, committed copy under src/gen/)
const PROTOS: &[(&str, &str, &str)] = &[
    ("workload.proto", "_.rs", "workload.rs"),
    (
        "plinth_server.proto",
        "plinth.server.v1.rs",
        "plinth.server.v1.rs",
    ),
    (
        "spire/api/types/spiffeid.proto",
        "spire.api.types.rs",
        "spire.api.types.rs",
    ),
    (
        "spire/api/agent/debug/v1/debug.proto",
        "spire.agent.debug.v1.rs",
        "spire.agent.debug.v1.rs",
    ),
];

fn generate(proto: &str, out_dir: &Path) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .out_dir(out_dir)
        .compile_protos(&[root.join("proto").join(proto)], &[root.join("proto")])
        .unwrap_or_else(|e| panic!("generating {proto} (is protoc installed?): {e}"));
}

#[test]
fn generated_code_matches_the_protos() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let regen = std::env::var_os("PLINTH_REGEN").is_some();
    for (proto, out_name, committed) in PROTOS {
        let dir = tempfile::tempdir().unwrap();
        generate(proto, dir.path());
        let fresh = std::fs::read_to_string(dir.path().join(out_name)).unwrap();
        let committed_path = root.join("src/gen").join(committed);
        if regen {
            std::fs::write(&committed_path, &fresh).unwrap();
            continue;
        }
        let old = std::fs::read_to_string(&committed_path).unwrap_or_default();
        assert!(
            old == fresh,
            "{} is out of date with proto/{proto}; run `PLINTH_REGEN=1 cargo test -p plinth-api \
             --test codegen` and commit the result",
            committed_path.display()
        );
    }
}
