//! Writes crates/weir-flight/src/gen/weir.v1.rs from protos/weir/v1/*.proto.

fn main() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = root.join("crates/weir-flight/src/gen");
    std::fs::create_dir_all(&out).expect("create the output folder");
    prost_build::Config::new()
        .out_dir(&out)
        .compile_protos(&[root.join("protos/weir/v1/ml.proto")], &[root.join("protos")])
        .expect("compile the protos (needs protoc: apt-get install protobuf-compiler)");
    println!("wrote {}", out.join("weir.v1.rs").display());
}
