//! containerd shim v2 for Torii pod VMs (`--runtime io.containerd.torii.v2`).

fn main() {
    torii_runtime::shim::main()
}
