//! Decoding an [`AdapterFile`] from an `embedded_io::Read`, whatever the bytes.
//!
//! Every length read from the file is checked before it sizes anything: a
//! fixed maximum first, then — when the caller knows the total size — the
//! bytes that remain. Without a known size, buffers are grown in bounded
//! steps as bytes arrive, so a hostile length costs at most what the stream
//! really delivers. The checksum is verified last, after the whole file
//! has been parsed; a parse error on a damaged file is reported as such.

use alloc::collections::BTreeSet;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use embedded_io::{Read, ReadExactError};
use half::f16;
use half::slice::HalfFloatSliceExt;

use super::{
    AdapterFile, DType, FORMAT_VERSION, Fail, Header, MAGIC, MAX_HEADER_LEN, MAX_NAME_LEN,
    MAX_TENSOR_ELEMENTS, MAX_TENSOR_RANK, MAX_TENSORS, NamedTensor, check_header, corrupt,
};

/// Bytes read per step when a buffer's final size is not yet trusted.
const STEP: usize = 64 << 10;
/// Payload bytes converted per chunk.
const CHUNK_BYTES: usize = 4096;

/// The stream, the checksum of what was consumed, and the position.
struct Source<'r, R> {
    r: &'r mut R,
    crc: crc32fast::Hasher,
    pos: u64,
    /// Total length, when known: lets lengths be checked against what is left.
    len: Option<u64>,
}

impl<R: Read> Source<'_, R> {
    /// Fills `buf` without adding it to the checksum.
    fn take_raw(&mut self, buf: &mut [u8], what: &str) -> Result<(), Fail<R::Error>> {
        match self.r.read_exact(buf) {
            Ok(()) => {
                self.pos += buf.len() as u64;
                Ok(())
            }
            Err(ReadExactError::UnexpectedEof) => Err(corrupt(format!(
                "truncated: the file ends inside the {what} that starts at byte {}",
                self.pos
            ))
            .into()),
            Err(ReadExactError::Other(e)) => Err(Fail::Io(e)),
        }
    }

    fn take(&mut self, buf: &mut [u8], what: &str) -> Result<(), Fail<R::Error>> {
        self.take_raw(buf, what)?;
        self.crc.update(buf);
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], Fail<R::Error>> {
        let mut b = [0u8; N];
        self.take(&mut b, what)?;
        Ok(b)
    }

    fn u8(&mut self, what: &str) -> Result<u8, Fail<R::Error>> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16, Fail<R::Error>> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &str) -> Result<u32, Fail<R::Error>> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, Fail<R::Error>> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// `len` as a `usize`, if it is within `max` and within what is left.
    fn bounded(&self, len: u64, max: u64, what: &str) -> Result<usize, Fail<R::Error>> {
        if len > max {
            return Err(corrupt(format!("{what} of {len} bytes exceeds the limit of {max}")).into());
        }
        if let Some(total) = self.len {
            let left = total.saturating_sub(self.pos);
            if len > left {
                return Err(corrupt(format!(
                    "{what} of {len} bytes at byte {} runs past the end of the {total}-byte file",
                    self.pos
                ))
                .into());
            }
        }
        usize::try_from(len).map_err(|_| {
            corrupt(format!("{what} of {len} bytes is too large for this platform")).into()
        })
    }

    /// `len` bytes, read in bounded steps.
    fn bytes(&mut self, len: usize, what: &str) -> Result<Vec<u8>, Fail<R::Error>> {
        let mut out = Vec::with_capacity(len.min(STEP));
        while out.len() < len {
            let start = out.len();
            out.resize(start + (len - start).min(STEP), 0);
            self.take(&mut out[start..], what)?;
        }
        Ok(out)
    }
}

/// Reads one file and returns it with the number of bytes consumed.
pub(crate) fn read_file<R: Read>(
    r: &mut R,
    len: Option<u64>,
) -> Result<(AdapterFile, u64), Fail<R::Error>> {
    let mut src = Source { r, crc: crc32fast::Hasher::new(), pos: 0, len };

    if src.array::<8>("magic")? != MAGIC {
        return Err(corrupt("not an adapter file (the magic is not `HYDRAEDG`)").into());
    }
    let version = src.u32("format version")?;
    if version != FORMAT_VERSION {
        return Err(corrupt(format!(
            "format version {version} is not supported (this build reads version {FORMAT_VERSION})"
        ))
        .into());
    }
    let header_len = src.u32("header length")?;
    let header_len = src.bounded(u64::from(header_len), MAX_HEADER_LEN as u64, "header")?;
    let header_bytes = src.bytes(header_len, "header")?;
    let header: Header = serde_json::from_slice(&header_bytes)
        .map_err(|e| corrupt(format!("the header is not valid JSON for an adapter: {e}")))?;
    drop(header_bytes);
    check_header(&header).map_err(|e| corrupt(format!("{e}")))?;

    let count = src.u32("tensor count")?;
    if count as usize > MAX_TENSORS {
        return Err(corrupt(format!("{count} tensors exceed the limit of {MAX_TENSORS}")).into());
    }
    let mut tensors = Vec::with_capacity((count as usize).min(1024));
    for _ in 0..count {
        tensors.push(read_tensor(&mut src)?);
    }
    let mut names = BTreeSet::new();
    for t in &tensors {
        if !names.insert(t.name.as_str()) {
            return Err(corrupt(format!("two tensors are named `{}`", t.name)).into());
        }
    }

    let computed = src.crc.clone().finalize();
    let mut stored = [0u8; 4];
    src.take_raw(&mut stored, "checksum")?;
    let stored = u32::from_le_bytes(stored);
    if stored != computed {
        return Err(corrupt(format!(
            "checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
        ))
        .into());
    }
    Ok((AdapterFile { header, tensors }, src.pos))
}

fn read_tensor<R: Read>(src: &mut Source<'_, R>) -> Result<NamedTensor, Fail<R::Error>> {
    let name_len = src.u16("tensor name length")?;
    let name_len = src.bounded(u64::from(name_len), MAX_NAME_LEN as u64, "tensor name")?;
    let name = String::from_utf8(src.bytes(name_len, "tensor name")?)
        .map_err(|_| corrupt(format!("a tensor name at byte {} is not UTF-8", src.pos)))?;
    let code = src.u8("tensor dtype")?;
    let dtype = DType::from_code(code)
        .ok_or_else(|| corrupt(format!("tensor `{name}` has unknown dtype code {code}")))?;
    let rank = usize::from(src.u8("tensor rank")?);
    if rank > MAX_TENSOR_RANK {
        return Err(corrupt(format!(
            "tensor `{name}` has rank {rank}, more than {MAX_TENSOR_RANK}"
        ))
        .into());
    }
    let mut shape = Vec::with_capacity(rank);
    let mut elements: u64 = 1;
    for _ in 0..rank {
        let d = src.u64("tensor dimension")?;
        elements =
            elements.checked_mul(d).filter(|&n| n <= MAX_TENSOR_ELEMENTS).ok_or_else(|| {
                corrupt(format!("tensor `{name}` has more than {MAX_TENSOR_ELEMENTS} elements"))
            })?;
        // Cannot fail once the product is within MAX_TENSOR_ELEMENTS on a
        // 64-bit target; on a 32-bit one it refuses what would not fit.
        shape.push(usize::try_from(d).map_err(|_| {
            corrupt(format!("tensor `{name}` dimension {d} is too large for this platform"))
        })?);
    }
    let size = dtype.size() as u64;
    let payload = src.bounded(elements * size, MAX_TENSOR_ELEMENTS * size, "tensor payload")?;
    let n = payload / dtype.size();
    // With a known file size the payload is already checked against it; over
    // an open-ended stream the vector grows only as data arrives.
    let reserve = if src.len.is_some() { n } else { n.min(STEP) };
    let mut data = Vec::with_capacity(reserve);
    let mut bytes = [0u8; CHUNK_BYTES];
    let mut left = n;
    while left > 0 {
        let k = left.min(CHUNK_BYTES / dtype.size());
        let chunk = &mut bytes[..k * dtype.size()];
        src.take(chunk, "tensor payload")?;
        match dtype {
            DType::F32 => data.extend(
                chunk.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            ),
            DType::F16 => {
                let mut halves = [f16::ZERO; CHUNK_BYTES / 2];
                let mut wide = [0f32; CHUNK_BYTES / 2];
                for (h, b) in halves.iter_mut().zip(chunk.chunks_exact(2)) {
                    *h = f16::from_bits(u16::from_le_bytes([b[0], b[1]]));
                }
                halves[..k].convert_to_f32_slice(&mut wide[..k]);
                data.extend_from_slice(&wide[..k]);
            }
        }
        left -= k;
    }
    Ok(NamedTensor { name, shape, dtype, data })
}
