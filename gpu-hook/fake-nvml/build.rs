//! The fake library answers to NVML's SONAME, as the real `libnvidia-ml.so.<version>` does, so
//! that `ldconfig` files it under `libnvidia-ml.so.1`.

fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libnvidia-ml.so.1");
    println!("cargo:rerun-if-changed=build.rs");
}
