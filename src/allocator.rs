//! The process's allocator: mimalloc, through its plain entry points where they give the
//! alignment a layout needs (see [`Mimalloc`]). A module of the binary, not the library:
//! the library forbids `unsafe`, and a `GlobalAlloc` is an unsafe trait.

/// mimalloc, asked through its plain entry points whenever they already give the alignment
/// the layout needs. `mimalloc::MiMalloc` sends every allocation to `mi_malloc_aligned`,
/// whose fast path only serves small blocks whose free list head happens to be aligned;
/// every other one (anything over 1 KiB, a page with no free block left) goes through
/// `mi_theap_malloc_zero_aligned_at_generic` and, for sizes that are not a power of two,
/// over-allocates `size + align - 1` and marks the page as holding interior pointers:
/// about 2,500 instructions per proxied request. Plain `mi_malloc` returns blocks aligned
/// to `MI_MAX_ALIGN_SIZE` (16) when the block is at least 16 bytes (bins round to double
/// words, pages start 16-aligned: mimalloc asserts it in `_mi_page_malloc_zero`), and to 8
/// below that, so `align <= 16 && align <= size` is served by it: the rule Rust's own
/// `System` allocator applies to `malloc`. Larger alignments keep the aligned entry points.
pub(crate) struct Mimalloc;

/// The 16 bytes `mi_malloc` aligns every block of at least 16 bytes to (`MI_MAX_ALIGN_SIZE`).
const MI_MAX_ALIGN_SIZE: usize = 16;

// mimalloc's stable C API, linked in by the `mimalloc` crate (through libmimalloc-sys).
extern "C" {
    fn mi_malloc(size: usize) -> *mut core::ffi::c_void;
    fn mi_zalloc(size: usize) -> *mut core::ffi::c_void;
    fn mi_realloc(p: *mut core::ffi::c_void, newsize: usize) -> *mut core::ffi::c_void;
}

/// Whether plain `mi_malloc` of `size` bytes is aligned to `align` (see [`Mimalloc`]).
#[inline]
fn plain(size: usize, align: usize) -> bool {
    align <= MI_MAX_ALIGN_SIZE && align <= size
}

// SAFETY: every block comes from mimalloc and goes back to it (`mi_free` takes blocks from
// the plain and the aligned entry points alike); `plain` admits only layouts whose
// alignment mimalloc's plain blocks always have.
unsafe impl std::alloc::GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if plain(layout.size(), layout.align()) {
            mi_malloc(layout.size()).cast()
        } else {
            mimalloc::MiMalloc.alloc(layout)
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        if plain(layout.size(), layout.align()) {
            mi_zalloc(layout.size()).cast()
        } else {
            mimalloc::MiMalloc.alloc_zeroed(layout)
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        mimalloc::MiMalloc.dealloc(ptr, layout)
    }

    // `mi_realloc` keeps the block when the new size still fits it (its alignment is the
    // one the layout had) and otherwise takes a fresh `mi_malloc` block of `new_size`,
    // aligned as `plain` says.
    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        if plain(new_size, layout.align()) {
            mi_realloc(ptr.cast(), new_size).cast()
        } else {
            mimalloc::MiMalloc.realloc(ptr, layout, new_size)
        }
    }
}
