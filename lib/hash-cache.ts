// Content identity without rereading: the sha256 of a file is remembered by path, size, mtime
// and inode, so an unchanged file is never read again. The same file remembers what each bucket
// object was proven to hold (its ETag and sha256), so an unchanged rerun needs only listings.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { pipeline } from 'node:stream/promises';
import { writeFileAtomic } from './files.ts';
import { SMALL_SOURCE, readSmallFile } from './storage.ts';

type FileEntry = [size: number, mtimeNs: string, ino: string, sha256: string];
type ObjectEntry = [etag: string, sha256: string];

interface CacheFile {
  version: 1;
  files: Record<string, FileEntry>;
  objects: Record<string, ObjectEntry>;
}

export interface FileStat {
  size: bigint;
  mtimeNs: bigint;
  ino: bigint;
}

export class HashCache {
  private dirty = false;
  /** Files hashed (read in full) by this process: the tests and benchmarks read it. */
  hashedFiles = 0;
  hashedBytes = 0;

  private constructor(
    readonly file: string | undefined,
    private data: CacheFile,
  ) {}

  /** Loads the cache; a missing or unreadable one starts empty (it is only a cache). */
  static load(file: string | undefined): HashCache {
    let data: CacheFile = { version: 1, files: {}, objects: {} };
    if (file) {
      try {
        const parsed = JSON.parse(fs.readFileSync(file, 'utf8')) as CacheFile;
        if (parsed.version === 1 && parsed.files && parsed.objects) data = parsed;
      } catch {
        /* first run, or a damaged cache: hash again */
      }
    }
    return new HashCache(file, data);
  }

  /** The file's sha256, read only when its path, size, mtime or inode changed. */
  async sha256(file: string, st: FileStat, signal?: AbortSignal): Promise<string> {
    const e = this.data.files[file];
    if (e && BigInt(e[0]) === st.size && e[1] === String(st.mtimeNs) && e[2] === String(st.ino)) return e[3];
    const sha256 =
      st.size <= SMALL_SOURCE
        ? crypto.createHash('sha256').update(await readSmallFile(file, Number(st.size))).digest('hex')
        : await hashFile(file, signal);
    this.hashedFiles++;
    this.hashedBytes += Number(st.size);
    this.data.files[file] = [Number(st.size), String(st.mtimeNs), String(st.ino), sha256];
    this.dirty = true;
    return sha256;
  }

  /** Forgets files under `root` that were not seen in this walk of it (deleted or renamed). */
  prune(root: string, seen: Set<string>) {
    const prefix = root.endsWith(path.sep) ? root : root + path.sep;
    for (const file of Object.keys(this.data.files)) {
      if (file.startsWith(prefix) && !seen.has(file)) {
        delete this.data.files[file];
        this.dirty = true;
      }
    }
  }

  /** What an object was proven to hold, if its ETag is still the one seen then. */
  knownObject(objectId: string, etag: string): string | undefined {
    const e = this.data.objects[objectId];
    return e && e[0] === etag ? e[1] : undefined;
  }

  recordObject(objectId: string, etag: string, sha256: string) {
    const e = this.data.objects[objectId];
    if (e && e[0] === etag && e[1] === sha256) return;
    this.data.objects[objectId] = [etag, sha256];
    this.dirty = true;
  }

  save() {
    if (!this.file || !this.dirty) return;
    fs.mkdirSync(path.dirname(this.file), { recursive: true, mode: 0o700 });
    writeFileAtomic(this.file, JSON.stringify(this.data), 0o600);
    this.dirty = false;
  }
}

export async function hashFile(file: string, signal?: AbortSignal, algorithm = 'sha256'): Promise<string> {
  const hash = crypto.createHash(algorithm);
  await pipeline(fs.createReadStream(file, { highWaterMark: 1 << 20 }), hash, { signal });
  return hash.digest('hex');
}

/**
 * The part size aws-cli used for a multipart upload: 8 MiB, doubled until the file fits in
 * 10,000 parts (s3transfer's ChunksizeAdjuster).
 */
export function awsCliPartSize(size: number): number {
  let part = 8 * 1024 * 1024;
  while (Math.ceil(size / part) > 10_000) part *= 2;
  return part;
}

/**
 * Whether an ETag proves a file's content, for objects uploaded by the bash scripts (no sha256
 * metadata): a plain MD5 for a single-part upload, or `md5(part md5s)-N` for a multipart one
 * with aws-cli's part size. Reads the file once, only when called.
 */
export async function etagProvesContent(file: string, size: number, etag: string, signal?: AbortSignal): Promise<boolean> {
  const m = /^([0-9a-f]{32})(?:-(\d+))?$/.exec(etag);
  if (!m) return false;
  if (m[2] === undefined) return (await hashFile(file, signal, 'md5')) === m[1];
  const parts = Number(m[2]);
  const partSize = awsCliPartSize(size);
  if (Math.ceil(size / partSize) !== parts) return false;
  const partDigests: Buffer[] = [];
  let part = crypto.createHash('md5');
  let inPart = 0;
  const stream = fs.createReadStream(file, { highWaterMark: 1 << 20, signal });
  for await (const chunk of stream as AsyncIterable<Buffer>) {
    let offset = 0;
    while (offset < chunk.length) {
      const take = Math.min(chunk.length - offset, partSize - inPart);
      part.update(chunk.subarray(offset, offset + take));
      offset += take;
      inPart += take;
      if (inPart === partSize) {
        partDigests.push(part.digest());
        part = crypto.createHash('md5');
        inPart = 0;
      }
    }
  }
  if (inPart > 0) partDigests.push(part.digest());
  const combined = crypto.createHash('md5').update(Buffer.concat(partDigests)).digest('hex');
  return partDigests.length === parts && combined === m[1];
}
