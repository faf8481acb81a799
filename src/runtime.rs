//! Process-wide knobs an app sets once at start-up, beside
//! [`crate::parallel::set_threads`].
//!
//! A training step allocates and frees activations of a few MB each. glibc
//! serves such blocks with fresh `mmap`s and hands them back on free, so every
//! step pays page faults and zeroing for memory it just released: about a
//! fifth of a MiniLM step on this project's machines (`hydra-edge train`,
//! 3.4 s → 2.7 s per epoch, same peak RSS). [`keep_freed_memory`] raises
//! glibc's mmap and trim thresholds so freed blocks are reused instead.

/// Keeps freed heap memory in the process for reuse (glibc: serves blocks up
/// to `max_block` bytes from the heap and trims it only beyond twice that).
/// Returns whether the allocator accepted it (always false off glibc).
pub fn keep_freed_memory(max_block: usize) -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let v = i32::try_from(max_block).unwrap_or(i32::MAX);
        let t = i32::try_from(max_block.saturating_mul(2)).unwrap_or(i32::MAX);
        // SAFETY: mallopt only changes allocator parameters; any value is valid input.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, v) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, t) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = max_block;
        false
    }
}

/// Returns freed heap memory to the system now (glibc `malloc_trim`): after
/// loading a model, whose file copy is no longer needed once the backbone
/// plan and the tail are built. Returns whether anything was released.
pub fn release_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only returns free heap pages to the system.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
