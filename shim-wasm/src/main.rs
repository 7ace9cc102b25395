//! `containerd-shim-hyperbox-wasm-v1`: WebAssembly containers under containerd through
//! wasmtime. See `DESIGN.md`.

fn main() -> std::process::ExitCode {
    // No OCI features document: the wasm engine runs modules, not Linux processes, so
    // `-info` reports its name and version only.
    hyperbox_shim_core::run(
        hyperbox_shim_wasm::RUNTIME,
        hyperbox_shim_wasm::prepare,
        || None,
    )
}
