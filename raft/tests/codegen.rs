//! The generated code under `src/gen/` is committed so that a build needs no `protoc`. This test
//! regenerates it from `proto/` with `tonic-prost-build` and fails if the committed copy drifted.
//! It needs `protoc` (`apt-get install -y protobuf-compiler`). To refresh the committed copy after
//! editing the `.proto`: `PLINTH_REGEN=1 cargo test -p plinth-raft --test codegen`.
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::path::PathBuf;

#[test]
fn generated_code_matches_the_proto() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .out_dir(dir.path())
        .compile_protos(
            &[root.join("proto/plinth_raft.proto")],
            &[root.join("proto")],
        )
        .unwrap_or_else(|e| panic!("generating plinth_raft.proto (is protoc installed?): {e}"));
    let fresh = std::fs::read_to_string(dir.path().join("plinth.raft.v1.rs")).unwrap();
    let committed_path = root.join("src/gen/plinth.raft.v1.rs");
    if std::env::var_os("PLINTH_REGEN").is_some() {
        std::fs::write(&committed_path, &fresh).unwrap();
        return;
    }
    let old = std::fs::read_to_string(&committed_path).unwrap_or_default();
    assert!(
        old == fresh,
        "{} is out of date with proto/plinth_raft.proto; run `PLINTH_REGEN=1 cargo test -p \
         plinth-raft --test codegen` and commit the result",
        committed_path.display()
    );
}
