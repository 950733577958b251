//! The process's allocator: mimalloc, asked for the alignment a layout needs
//! only when its plain allocation does not already give it.
//!
//! mimalloc's size classes are multiples of eight bytes in pages that start
//! sixteen-byte aligned, so every block `mi_malloc` returns is aligned to
//! eight bytes, and blocks of less than eight bytes hold types of at most
//! their size's alignment. Most of the proxy's allocations (boxed futures,
//! header maps, byte buffers) ask for no more: they go to `mi_malloc`, whose
//! fast path skips the aligned entry's checks that the `mimalloc` crate's
//! allocator pays on every call: about 20 instructions an allocation
//! (callgrind: 1.2k a request on a sidecar running three plugins, which
//! allocates 57 times a request; 0.4k without plugins). Larger alignments
//! still go to `mi_malloc_aligned`.

use core::alloc::{GlobalAlloc, Layout};
use core::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment every mimalloc block has.
const BLOCK_ALIGN: usize = 8;

/// Whether a plain mimalloc block of `size` bytes is aligned enough for `align`.
fn plain_block_fits(align: usize, size: usize) -> bool {
    align <= BLOCK_ALIGN && align <= size
}

/// mimalloc as the global allocator.
pub struct MiMalloc;

// SAFETY: each method hands mimalloc a request it serves with a block of at
// least the layout's size and alignment (plain calls only where the block's
// own alignment covers the layout's, see the module comment), or null when
// it cannot; every block, however obtained, is released with `mi_free`.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: see the impl's comment.
        unsafe {
            if plain_block_fits(layout.align(), layout.size()) {
                mi::mi_malloc(layout.size()).cast()
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: see the impl's comment.
        unsafe {
            if plain_block_fits(layout.align(), layout.size()) {
                mi::mi_zalloc(layout.size()).cast()
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator, so from mimalloc.
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator; the new block keeps the
        // layout's alignment by the same rule as `alloc`.
        unsafe {
            if plain_block_fits(layout.align(), new_size) {
                mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every size and alignment a Rust type can ask for in the small
    /// classes gets a block aligned as asked, allocated, grown, shrunk and
    /// zeroed through the process's allocator.
    #[test]
    fn blocks_have_the_alignment_their_layout_asks_for() {
        for align in [1, 2, 4, 8, 16, 32, 64, 4096] {
            for size in (1..=600).chain([1024, 4000, 65_536, 1 << 20]) {
                let Ok(layout) = Layout::from_size_align(size, align) else {
                    continue;
                };
                let mut kept = Vec::new();
                for _ in 0..4 {
                    // SAFETY: a non-zero size; the block is released below.
                    #[allow(unsafe_code)]
                    let (block, zeroed) =
                        unsafe { (MiMalloc.alloc(layout), MiMalloc.alloc_zeroed(layout)) };
                    assert!(!block.is_null() && !zeroed.is_null());
                    assert_eq!(block as usize % align, 0, "size {size} align {align}");
                    assert_eq!(
                        zeroed as usize % align,
                        0,
                        "size {size} align {align} zeroed"
                    );
                    // SAFETY: `zeroed` holds `size` bytes.
                    #[allow(unsafe_code)]
                    let bytes = unsafe { std::slice::from_raw_parts(zeroed, size) };
                    assert!(bytes.iter().all(|&b| b == 0));
                    kept.push((block, zeroed));
                }
                for (block, zeroed) in kept {
                    // SAFETY: blocks from `alloc` with `layout`, resized to
                    // non-zero sizes, then released once.
                    #[allow(unsafe_code)]
                    unsafe {
                        let grown = MiMalloc.realloc(block, layout, size * 3);
                        assert_eq!(
                            grown as usize % align,
                            0,
                            "grown: size {size} align {align}"
                        );
                        let grown_layout = Layout::from_size_align(size * 3, align).unwrap();
                        let shrunk = MiMalloc.realloc(grown, grown_layout, size.div_ceil(2));
                        assert_eq!(
                            shrunk as usize % align,
                            0,
                            "shrunk: size {size} align {align}"
                        );
                        let shrunk_layout =
                            Layout::from_size_align(size.div_ceil(2), align).unwrap();
                        MiMalloc.dealloc(shrunk, shrunk_layout);
                        MiMalloc.dealloc(zeroed, layout);
                    }
                }
            }
        }
    }
}
