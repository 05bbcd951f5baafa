//! raft-bench's etcd client code under `src/bin/raft-bench/gen/` is committed so that a build
//! needs no `protoc`. This test regenerates it from `proto/etcd_kv.proto` and fails if the
//! committed copy drifted. It needs `protoc` (`apt-get install -y protobuf-compiler`). To refresh
//! after editing the `.proto`: `PLINTH_REGEN=1 cargo test -p plinth-chaos --test t20_etcd_codegen`.
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::path::PathBuf;

#[test]
fn etcd_client_code_matches_the_proto() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .out_dir(dir.path())
        .compile_protos(&[root.join("proto/etcd_kv.proto")], &[root.join("proto")])
        .unwrap_or_else(|e| panic!("generating etcd_kv.proto (is protoc installed?): {e}"));
    let fresh = std::fs::read_to_string(dir.path().join("etcdserverpb.rs")).unwrap();
    let committed_path = root.join("src/bin/raft-bench/gen/etcdserverpb.rs");
    if std::env::var_os("PLINTH_REGEN").is_some() {
        std::fs::write(&committed_path, &fresh).unwrap();
        return;
    }
    let old = std::fs::read_to_string(&committed_path).unwrap_or_default();
    assert!(
        old == fresh,
        "{} is out of date with proto/etcd_kv.proto; run `PLINTH_REGEN=1 cargo test -p \
         plinth-chaos --test t20_etcd_codegen` and commit the result",
        committed_path.display()
    );
}
