//! Blosc (version 1 format) chunks with byte shuffle and LZ4, compressed on all cores.
//!
//! HDF5's Blosc filter (id 32001, from hdf5plugin) compresses one chunk at a time on
//! one thread. For large arrays h5ckpt compresses the chunks here instead, in
//! parallel, and hands each finished chunk to HDF5 as a direct chunk write. The
//! chunks are ordinary Blosc 1 frames, so any Blosc filter decompresses them:
//!
//! ```text
//! header (16 bytes): version 2, LZ4 format version 1, flags, typesize,
//!                    nbytes (u32 le), blocksize (u32 le), total frame size (u32 le)
//! bstarts:           one u32 le per block: offset of the block in the frame
//! block:             one or `typesize` streams (below), each a u32 le size and
//!                    then the LZ4 block format of its part of the byte-shuffled
//!                    block, or that part itself when the size equals its length
//! ```
//!
//! flags: bit 0 byte shuffle, bit 4 "do not split" (one stream per block), bits 5-7
//! the compressor format (1 = LZ4). Blocks are split as c-blosc 1.x splits them, so
//! readers of any c-blosc version agree on the layout.

use rayon::prelude::*;

use crate::error::{Error, Result};

const HEADER: usize = 16;
const VERSION_FORMAT: u8 = 2;
const LZ4_VERSION_FORMAT: u8 = 1;
const FLAG_SHUFFLE: u8 = 0x01;
const FLAG_MEMCPYED: u8 = 0x02;
const FLAG_DONT_SPLIT: u8 = 0x10;
const LZ4_FORMAT: u8 = 1;
/// Bytes per Blosc block: each is shuffled and compressed on its own.
pub const BLOCK_BYTES: usize = 128 << 10;
/// c-blosc's rule for splitting a block into one stream per byte of the element.
const MAX_SPLITS: usize = 16;
const MIN_SPLIT_ELEMENTS: usize = 128;
/// The largest chunk a Blosc 1 frame holds.
pub const MAX_CHUNK_BYTES: usize = i32::MAX as usize - HEADER;

/// Byte shuffle of `src` (a whole number of `typesize` elements, plus a tail that
/// is copied as it is) into `dst`: byte `j` of element `i` goes to `j * n + i`.
fn shuffle(typesize: usize, src: &[u8], dst: &mut [u8]) {
    let n = src.len() / typesize;
    for (i, elem) in src[..n * typesize].chunks_exact(typesize).enumerate() {
        for (j, &b) in elem.iter().enumerate() {
            dst[j * n + i] = b;
        }
    }
    dst[n * typesize..].copy_from_slice(&src[n * typesize..]);
}

/// Transposes the 8x8 byte matrix whose row `i` is `r[i]` (byte `j` = column `j`).
#[inline]
fn transpose8x8(r: &mut [u64; 8]) {
    for i in 0..4 {
        let t = ((r[i] >> 32) ^ r[i + 4]) & 0x0000_0000_FFFF_FFFF;
        r[i] ^= t << 32;
        r[i + 4] ^= t;
    }
    for i in [0, 1, 4, 5] {
        let t = ((r[i] >> 16) ^ r[i + 2]) & 0x0000_FFFF_0000_FFFF;
        r[i] ^= t << 16;
        r[i + 2] ^= t;
    }
    for i in [0, 2, 4, 6] {
        let t = ((r[i] >> 8) ^ r[i + 1]) & 0x00FF_00FF_00FF_00FF;
        r[i] ^= t << 8;
        r[i + 1] ^= t;
    }
}

/// [`shuffle`] for 8-byte elements (float64, int64), eight elements at a time.
fn shuffle8(src: &[u8], dst: &mut [u8]) {
    let n = src.len() / 8;
    let groups = n / 8;
    for (g, block) in src[..groups * 64].chunks_exact(64).enumerate() {
        let mut r = [0u64; 8];
        for (i, word) in block.chunks_exact(8).enumerate() {
            r[i] = u64::from_le_bytes(word.try_into().expect("8 bytes"));
        }
        transpose8x8(&mut r);
        for (j, word) in r.iter().enumerate() {
            let at = j * n + g * 8;
            dst[at..at + 8].copy_from_slice(&word.to_le_bytes());
        }
    }
    for i in groups * 8..n {
        for j in 0..8 {
            dst[j * n + i] = src[i * 8 + j];
        }
    }
    dst[n * 8..].copy_from_slice(&src[n * 8..]);
}

/// The most bytes [`compress_chunk_into`] writes for a chunk of `nbytes`: header,
/// block starts, and every block stored with its 4-byte size. An error where that
/// number does not fit a `usize`.
pub fn max_frame_len(nbytes: usize) -> Result<usize> {
    // Blocks are at least BLOCK_BYTES - 254 long (a multiple of the typesize), plus
    // one leftover; each has a start and up to MAX_SPLITS streams with their sizes.
    let nblocks = nbytes.div_ceil(BLOCK_BYTES - 254) + 1;
    (4 + 4 * MAX_SPLITS)
        .checked_mul(nblocks)
        .and_then(|sizes| sizes.checked_add(nbytes))
        .and_then(|n| n.checked_add(HEADER))
        .ok_or_else(|| {
            Error::invalid(format!(
                "a Blosc frame of a {nbytes}-byte chunk would be larger than memory"
            ))
        })
}

/// Bytes of output space for the frames of `data_len` bytes in chunks of
/// `chunk_bytes` (> 0), one [`max_frame_len`] slot each: `(slot, total)`.
fn frames_space(data_len: usize, chunk_bytes: usize) -> Result<(usize, usize)> {
    let slot = max_frame_len(chunk_bytes)?;
    let n = data_len.div_ceil(chunk_bytes);
    let total = n.checked_mul(slot).ok_or_else(|| {
        Error::invalid(format!(
            "the Blosc frames of {n} chunks of {chunk_bytes} bytes would be larger than memory"
        ))
    })?;
    Ok((slot, total))
}

/// Scratch space of one thread: a shuffled block and its compressed form.
#[derive(Default)]
struct Scratch {
    shuffled: Vec<u8>,
    packed: Vec<u8>,
}

/// Writes `chunk` as a Blosc 1 frame (byte shuffle + LZ4, one stream per block)
/// into `out`, which holds at least [`max_frame_len`] bytes; returns its length.
pub fn compress_chunk_into(chunk: &[u8], typesize: usize, out: &mut [u8]) -> Result<usize> {
    compress_with(chunk, typesize, out, &mut Scratch::default())
}

fn compress_with(
    chunk: &[u8],
    typesize: usize,
    out: &mut [u8],
    scratch: &mut Scratch,
) -> Result<usize> {
    if chunk.len() > MAX_CHUNK_BYTES {
        return Err(Error::invalid(format!(
            "a Blosc chunk holds at most {MAX_CHUNK_BYTES} bytes, got {}",
            chunk.len()
        )));
    }
    if out.len() < max_frame_len(chunk.len())? {
        return Err(Error::invalid(
            "the output space is smaller than max_frame_len",
        ));
    }
    let typesize = if (1..=255).contains(&typesize) {
        typesize
    } else {
        1
    };
    let nbytes = chunk.len();
    let shuffled = typesize > 1;
    // As c-blosc does: blocks a whole number of elements long, each split into one
    // stream per byte of the element (the shuffled byte planes) when elements are
    // at most MAX_SPLITS bytes and a block holds at least MIN_SPLIT_ELEMENTS of
    // them; the last, shorter block is never split. Otherwise "do not split".
    let mut blocksize = BLOCK_BYTES.min(nbytes).max(1);
    if blocksize > typesize {
        blocksize = blocksize / typesize * typesize;
    }
    let nblocks = nbytes.div_ceil(blocksize);
    let split = typesize <= MAX_SPLITS && blocksize / typesize >= MIN_SPLIT_ELEMENTS;
    let mut flags = LZ4_FORMAT << 5;
    if !split {
        flags |= FLAG_DONT_SPLIT;
    }
    if nbytes == 0 {
        flags |= FLAG_MEMCPYED; // an empty frame: a copy of nothing
    } else if shuffled {
        flags |= FLAG_SHUFFLE;
    }
    out[..4].copy_from_slice(&[VERSION_FORMAT, LZ4_VERSION_FORMAT, flags, typesize as u8]);
    out[4..8].copy_from_slice(&(nbytes as u32).to_le_bytes());
    out[8..12].copy_from_slice(&(blocksize as u32).to_le_bytes());
    let mut pos = HEADER;
    if nbytes > 0 {
        let starts_at = pos;
        pos += 4 * nblocks;
        scratch.shuffled.resize(blocksize, 0);
        scratch
            .packed
            .resize(lz4_flex::block::get_maximum_output_size(blocksize), 0);
        for (k, block) in chunk.chunks(blocksize).enumerate() {
            out[starts_at + 4 * k..starts_at + 4 * k + 4]
                .copy_from_slice(&(pos as u32).to_le_bytes());
            // The block is read from the caller's memory once, shuffled or copied:
            // the caller may change it meanwhile (an array updated in place during a
            // save), and the compressor and the stored fallback must see one state.
            let t = &mut scratch.shuffled[..block.len()];
            if !shuffled {
                t.copy_from_slice(block);
            } else if typesize == 8 {
                shuffle8(block, t);
            } else {
                shuffle(typesize, block, t);
            }
            let src: &[u8] = t;
            let nsplits = if split && block.len() == blocksize {
                typesize
            } else {
                1
            };
            for part in src.chunks_exact(block.len() / nsplits) {
                let n = lz4_flex::block::compress_into(part, &mut scratch.packed)
                    .map_err(|e| Error::invalid(format!("LZ4 compression failed: {e}")))?;
                // An incompressible stream is stored: its size equals the part's.
                let stream = if n < part.len() {
                    &scratch.packed[..n]
                } else {
                    part
                };
                out[pos..pos + 4].copy_from_slice(&(stream.len() as u32).to_le_bytes());
                out[pos + 4..pos + 4 + stream.len()].copy_from_slice(stream);
                pos += 4 + stream.len();
            }
        }
    }
    out[12..16].copy_from_slice(&(pos as u32).to_le_bytes());
    Ok(pos)
}

/// One chunk as a Blosc 1 frame, in a new vector.
pub fn compress_chunk(chunk: &[u8], typesize: usize) -> Result<Vec<u8>> {
    let mut out = vec![0u8; max_frame_len(chunk.len())?];
    let n = compress_chunk_into(chunk, typesize, &mut out)?;
    out.truncate(n);
    Ok(out)
}

/// Splits `data` into chunks of `chunk_bytes` (the last one padded with zeros to
/// the full size, as HDF5 stores edge chunks) and compresses them on all cores,
/// chunk `i` into `out[i * slot..(i + 1) * slot]` with `slot =
/// max_frame_len(chunk_bytes)`. Returns the length of each frame.
pub fn compress_chunks_into(
    data: &[u8],
    chunk_bytes: usize,
    typesize: usize,
    out: &mut [u8],
) -> Result<Vec<usize>> {
    if chunk_bytes == 0 {
        return Err(Error::invalid("chunk_bytes must be positive"));
    }
    let (slot, need) = frames_space(data.len(), chunk_bytes)?;
    if out.len() < need {
        return Err(Error::invalid(format!(
            "the output holds {} bytes, {} chunks need {need}",
            out.len(),
            data.len().div_ceil(chunk_bytes)
        )));
    }
    data.par_chunks(chunk_bytes)
        .zip(out.par_chunks_mut(slot))
        .map_init(Scratch::default, |scratch, (chunk, dst)| {
            if chunk.len() == chunk_bytes {
                compress_with(chunk, typesize, dst, scratch)
            } else {
                let mut padded = chunk.to_vec();
                padded.resize(chunk_bytes, 0);
                compress_with(&padded, typesize, dst, scratch)
            }
        })
        .collect()
}

/// [`compress_chunks_into`] returning one vector per frame.
pub fn compress_chunks(data: &[u8], chunk_bytes: usize, typesize: usize) -> Result<Vec<Vec<u8>>> {
    if chunk_bytes == 0 {
        return Err(Error::invalid("chunk_bytes must be positive"));
    }
    let (slot, need) = frames_space(data.len(), chunk_bytes)?;
    let mut out = vec![0u8; need];
    let lens = compress_chunks_into(data, chunk_bytes, typesize, &mut out)?;
    Ok(out
        .chunks(slot)
        .zip(lens)
        .map(|(frame, n)| frame[..n].to_vec())
        .collect())
}

/// Compressed size over raw size of `data` as [`compress_chunk`] stores it.
pub fn ratio(data: &[u8], typesize: usize) -> Result<f64> {
    if data.is_empty() {
        return Ok(1.0);
    }
    let stored: usize = data
        .par_chunks(BLOCK_BYTES * 8)
        .map(|c| compress_chunk(c, typesize).map(|f| f.len()))
        .sum::<Result<usize>>()?;
    Ok(stored as f64 / data.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reference decoder of the frames written here, straight from the format.
    fn decompress(frame: &[u8]) -> Vec<u8> {
        assert_eq!(frame[0], VERSION_FORMAT);
        assert_eq!(frame[1], LZ4_VERSION_FORMAT);
        let flags = frame[2];
        let typesize = frame[3] as usize;
        let u32_at = |i: usize| u32::from_le_bytes(frame[i..i + 4].try_into().unwrap()) as usize;
        let (nbytes, blocksize, total) = (u32_at(4), u32_at(8), u32_at(12));
        assert_eq!(total, frame.len());
        assert_eq!(flags >> 5, LZ4_FORMAT);
        if flags & FLAG_MEMCPYED != 0 {
            return frame[HEADER..HEADER + nbytes].to_vec();
        }
        let dont_split = flags & FLAG_DONT_SPLIT != 0;
        let nblocks = nbytes.div_ceil(blocksize);
        let mut out = Vec::new();
        for k in 0..nblocks {
            let bsize = blocksize.min(nbytes - k * blocksize);
            let leftover = k == nblocks - 1 && nbytes % blocksize != 0;
            let nsplits = if !dont_split
                && typesize <= MAX_SPLITS
                && bsize / typesize >= MIN_SPLIT_ELEMENTS
                && !leftover
            {
                typesize
            } else {
                1
            };
            let neblock = bsize / nsplits;
            let mut at = u32_at(HEADER + 4 * k);
            let mut block = Vec::with_capacity(bsize);
            for _ in 0..nsplits {
                let csize = u32_at(at);
                let stream = &frame[at + 4..at + 4 + csize];
                if csize == neblock {
                    block.extend_from_slice(stream);
                } else {
                    block.extend_from_slice(&lz4_flex::block::decompress(stream, neblock).unwrap());
                }
                at += 4 + csize;
            }
            if flags & FLAG_SHUFFLE != 0 && typesize > 1 {
                let n = bsize / typesize;
                let mut plain = block.clone();
                for i in 0..n {
                    for j in 0..typesize {
                        plain[i * typesize + j] = block[j * n + i];
                    }
                }
                out.extend_from_slice(&plain);
            } else {
                out.extend_from_slice(&block);
            }
        }
        out
    }

    fn smooth(n: usize) -> Vec<u8> {
        let mut x = 0.0f64;
        let mut s = 12345u64;
        (0..n)
            .flat_map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                x += ((s >> 11) as f64 / (1u64 << 53) as f64) - 0.5;
                x.to_le_bytes()
            })
            .collect()
    }

    #[test]
    fn round_trips_through_the_format() {
        let data = smooth(100_000);
        for typesize in [1usize, 2, 4, 8, 3, 16] {
            for len in [
                0usize,
                1,
                7,
                8,
                100,
                4096,
                BLOCK_BYTES,
                BLOCK_BYTES + 13,
                800_000,
            ] {
                let frame = compress_chunk(&data[..len], typesize).unwrap();
                assert_eq!(
                    decompress(&frame),
                    &data[..len],
                    "typesize {typesize} len {len}"
                );
            }
        }
    }

    #[test]
    fn compresses_smooth_data_and_stores_noise() {
        let data = smooth(200_000);
        assert!(ratio(&data, 8).unwrap() < 0.85);
        let mut s = 99u64;
        let noise: Vec<u8> = (0..1_600_000)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
                (s >> 56) as u8
            })
            .collect();
        let r = ratio(&noise, 8).unwrap();
        assert!(r > 0.99 && r < 1.01, "{r}");
        assert_eq!(decompress(&compress_chunk(&noise, 8).unwrap()), noise);
    }

    #[test]
    fn chunks_are_padded_to_full_size() {
        let data = smooth(10_000); // 80_000 bytes
        let chunks = compress_chunks(&data, 30_000, 8).unwrap();
        assert_eq!(chunks.len(), 3);
        let mut all = Vec::new();
        for c in &chunks {
            let plain = decompress(c);
            assert_eq!(plain.len(), 30_000);
            all.extend_from_slice(&plain);
        }
        assert_eq!(&all[..80_000], &data[..]);
        assert!(all[80_000..].iter().all(|&b| b == 0));
        assert!(compress_chunks(&data, 0, 8).is_err());
    }

    #[test]
    fn frame_sizes_that_overflow_are_errors() {
        assert_eq!(max_frame_len(0).unwrap(), HEADER + 4 + 4 * MAX_SPLITS);
        let largest = max_frame_len(MAX_CHUNK_BYTES).unwrap();
        assert!(largest > MAX_CHUNK_BYTES && largest < MAX_CHUNK_BYTES + (2 << 20));
        for nbytes in [usize::MAX, usize::MAX - HEADER, usize::MAX - (1 << 30)] {
            let e = max_frame_len(nbytes).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        }
        // Each slot fits, all of them together do not.
        let (slot, total) = frames_space(1000, 1).unwrap();
        assert_eq!(total, 1000 * slot);
        assert!(frames_space(usize::MAX, 1).is_err());
        assert!(frames_space(usize::MAX, 1 << 20).is_err());
        assert!(frames_space(usize::MAX, usize::MAX).is_err());
    }
}
