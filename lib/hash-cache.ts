// Content identity without rereading: the sha256 of a file is remembered by path, size, mtime
// and inode, so an unchanged file is never read again. The same file remembers what each bucket
// object was proven to hold (its ETag and sha256), so an unchanged rerun needs only listings.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { hashFile, readRegular, readRegularFileSync, writeFileAtomic, type Fingerprint } from './files.ts';
import { fingerprintFile } from './storage.ts';

export { hashFile };

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

  /**
   * Loads the cache; a missing or unreadable one starts empty (it is only a cache), and an entry
   * that is not of the expected shape is dropped (its file is hashed again).
   */
  static load(file: string | undefined): HashCache {
    const data: CacheFile = { version: 1, files: {}, objects: {} };
    if (file) {
      try {
        const parsed = JSON.parse(readRegularFileSync(file).toString('utf8')) as Partial<CacheFile>;
        if (parsed?.version === 1) {
          for (const [k, e] of Object.entries(parsed.files ?? {})) if (isFileEntry(e)) data.files[k] = e;
          for (const [k, e] of Object.entries(parsed.objects ?? {})) if (isObjectEntry(e)) data.objects[k] = e;
        }
      } catch {
        /* first run, or a damaged cache: hash again */
      }
    }
    return new HashCache(file, data);
  }

  /**
   * The file's sha256, read only when its path, size, mtime or inode changed. When it was read
   * now, its fingerprint comes with it (what is sent is checked against it).
   */
  async hash(file: string, st: FileStat, signal?: AbortSignal): Promise<{ sha256: string; fingerprint?: Fingerprint }> {
    const e = this.data.files[file];
    if (e && BigInt(e[0]) === st.size && e[1] === String(st.mtimeNs) && e[2] === String(st.ino)) return { sha256: e[3] };
    const fingerprint = await fingerprintFile(file, signal);
    this.remember(file, fingerprint);
    return { sha256: fingerprint.sha256, fingerprint };
  }

  /** Records what a file held when it was read (by the stat it had then, not the walk's). */
  remember(file: string, fp: Fingerprint) {
    this.hashedFiles++;
    this.hashedBytes += fp.size;
    this.data.files[file] = [fp.size, String(fp.mtimeNs), String(fp.ino), fp.sha256];
    this.dirty = true;
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

const HEX64 = /^[0-9a-f]{64}$/;
const isFileEntry = (e: unknown): e is FileEntry =>
  Array.isArray(e) && e.length === 4 && Number.isSafeInteger(e[0]) && e[0] >= 0 && /^\d+$/.test(e[1]) && /^\d+$/.test(e[2]) && HEX64.test(e[3]);
const isObjectEntry = (e: unknown): e is ObjectEntry =>
  Array.isArray(e) && e.length === 2 && typeof e[0] === 'string' && HEX64.test(e[1]);

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
  await readRegular(file, (chunk) => {
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
  }, signal);
  if (inPart > 0) partDigests.push(part.digest());
  const combined = crypto.createHash('md5').update(Buffer.concat(partDigests)).digest('hex');
  return partDigests.length === parts && combined === m[1];
}
