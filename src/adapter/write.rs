//! Encoding an [`AdapterFile`] onto an `embedded_io::Write`.
//!
//! Everything is checked before the first byte goes out, so a refused file
//! leaves the sink untouched. Payloads are converted through a small stack
//! buffer: writing never holds a second copy of a tensor.

use alloc::collections::BTreeSet;
use alloc::format;

use embedded_io::{ErrorKind, Write};
use half::f16;
use half::slice::HalfFloatSliceExt;

use super::{
    AdapterFile, DType, FORMAT_VERSION, Fail, MAGIC, MAX_HEADER_LEN, MAX_NAME_LEN,
    MAX_TENSOR_ELEMENTS, MAX_TENSOR_RANK, MAX_TENSORS, NamedTensor, check_header,
};
use crate::error::{Error, Result};

/// Elements converted per chunk (4 KiB of f32).
const CHUNK: usize = 1024;

/// The sink plus the running checksum of everything written so far.
struct Sink<'w, W> {
    w: &'w mut W,
    crc: crc32fast::Hasher,
}

impl<W: Write> Sink<'_, W> {
    fn put(&mut self, bytes: &[u8]) -> Result<(), Fail<W::Error>> {
        self.crc.update(bytes);
        write_all(self.w, bytes)
    }
}

/// `write_all` without `embedded_io`'s panic on a sink that accepts nothing.
fn write_all<W: Write>(w: &mut W, mut bytes: &[u8]) -> Result<(), Fail<W::Error>> {
    while !bytes.is_empty() {
        match w.write(bytes) {
            Ok(0) => {
                return Err(Fail::Format(Error::Stream {
                    context: "writing an adapter file",
                    kind: ErrorKind::WriteZero,
                }));
            }
            Ok(n) => bytes = &bytes[n.min(bytes.len())..],
            Err(e) => return Err(Fail::Io(e)),
        }
    }
    Ok(())
}

/// Checks what the format can hold: name length, rank, and that the data
/// fills the shape exactly.
pub(crate) fn check_tensor(t: &NamedTensor) -> Result<()> {
    if t.name.len() > MAX_NAME_LEN {
        return Err(Error::Config(format!(
            "adapter tensor name of {} bytes exceeds {MAX_NAME_LEN}",
            t.name.len()
        )));
    }
    if t.shape.len() > MAX_TENSOR_RANK {
        return Err(Error::Config(format!(
            "adapter tensor `{}` has rank {}, more than {MAX_TENSOR_RANK}",
            t.name,
            t.shape.len()
        )));
    }
    let elements = t
        .shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .filter(|&n| n <= MAX_TENSOR_ELEMENTS);
    if elements != Some(t.data.len() as u64) {
        return Err(Error::Shape {
            context: "adapter tensor",
            expected: format!("`{}`: {} values for shape {:?}", t.name, t.data.len(), t.shape),
            got: match elements {
                Some(n) => format!("a shape of {n} elements"),
                None => format!("a shape of more than {MAX_TENSOR_ELEMENTS} elements"),
            },
        });
    }
    Ok(())
}

pub(crate) fn write_file<W: Write>(file: &AdapterFile, w: &mut W) -> Result<(), Fail<W::Error>> {
    check_header(&file.header)?;
    let header = serde_json::to_vec(&file.header)
        .map_err(|e| Error::Config(format!("adapter header does not encode as JSON: {e}")))?;
    if header.len() > MAX_HEADER_LEN {
        return Err(Error::Config(format!(
            "adapter header of {} bytes exceeds {MAX_HEADER_LEN}",
            header.len()
        ))
        .into());
    }
    if file.tensors.len() > MAX_TENSORS {
        return Err(Error::Config(format!(
            "{} tensors exceed the format's {MAX_TENSORS}",
            file.tensors.len()
        ))
        .into());
    }
    let mut names = BTreeSet::new();
    for t in &file.tensors {
        check_tensor(t)?;
        if !names.insert(t.name.as_str()) {
            return Err(Error::Config(format!("two adapter tensors are named `{}`", t.name)).into());
        }
    }

    let mut sink = Sink { w, crc: crc32fast::Hasher::new() };
    sink.put(&MAGIC)?;
    sink.put(&FORMAT_VERSION.to_le_bytes())?;
    sink.put(&(header.len() as u32).to_le_bytes())?;
    sink.put(&header)?;
    sink.put(&(file.tensors.len() as u32).to_le_bytes())?;
    for t in &file.tensors {
        sink.put(&(t.name.len() as u16).to_le_bytes())?;
        sink.put(t.name.as_bytes())?;
        sink.put(&[t.dtype.code(), t.shape.len() as u8])?;
        for &d in &t.shape {
            sink.put(&(d as u64).to_le_bytes())?;
        }
        put_payload(&mut sink, t)?;
    }
    let crc = sink.crc.clone().finalize();
    write_all(sink.w, &crc.to_le_bytes())?;
    sink.w.flush().map_err(Fail::Io)
}

fn put_payload<W: Write>(sink: &mut Sink<'_, W>, t: &NamedTensor) -> Result<(), Fail<W::Error>> {
    let mut bytes = [0u8; 4 * CHUNK];
    for chunk in t.data.chunks(CHUNK) {
        let n = match t.dtype {
            DType::F32 => {
                for (out, x) in bytes.chunks_exact_mut(4).zip(chunk) {
                    out.copy_from_slice(&x.to_le_bytes());
                }
                4 * chunk.len()
            }
            DType::F16 => {
                let mut halves = [f16::ZERO; CHUNK];
                let halves = &mut halves[..chunk.len()];
                halves.convert_from_f32_slice(chunk);
                for (out, h) in bytes.chunks_exact_mut(2).zip(halves.iter()) {
                    out.copy_from_slice(&h.to_bits().to_le_bytes());
                }
                2 * chunk.len()
            }
        };
        sink.put(&bytes[..n])?;
    }
    Ok(())
}
