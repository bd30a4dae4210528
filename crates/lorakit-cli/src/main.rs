//! The `lorakit` binary: the program is `lorakit_cli::run`.
// Large buffers on cache lines: the AVX-512 kernels are faster on aligned rows.
#[global_allocator]
static ALLOCATOR: lorakit::engine::aligned_alloc::CacheLineAligned =
    lorakit::engine::aligned_alloc::CacheLineAligned;

fn main() -> std::process::ExitCode {
    lorakit_cli::run()
}
