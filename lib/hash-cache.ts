// Content identity without rereading: the sha256 of a file is remembered by path, size, mtime
// and inode, so an unchanged file is never read again. The same file remembers what each bucket
// object was proven to hold (its ETag and sha256), so an unchanged rerun needs only listings.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';
import {
  compareKeys,
  hashFile,
  openRegular,
  partialName,
  readRegular,
  readRegularFileSync,
  writeFileAtomic,
  type Fingerprint,
} from './files.ts';
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
    if (e && BigInt(e[0]) === st.size && e[1] === String(st.mtimeNs) && e[2] === String(st.ino))
      return { sha256: e[3] };
    const fingerprint = await fingerprintFile(file, signal);
    this.remember(file, fingerprint);
    return { sha256: fingerprint.sha256, fingerprint };
  }

  /** Records what a file held when it was read (by the stat it had then, not the walk's). */
  remember(file: string, fp: Fingerprint) {
    this.data.files[file] = [fp.size, String(fp.mtimeNs), String(fp.ino), fp.sha256];
    this.dirty = true;
  }

  /**
   * Saves the cache; one that cannot be written (a full disk) costs only hashing again next time,
   * so it is a warning naming the file, never a failure of the work that was done.
   */
  trySave(): string | undefined {
    try {
      this.save();
      return undefined;
    } catch (e) {
      return `hash cache not saved (${errorOf(e, this.file ?? 'the cache')}): unchanged files will be hashed again next run`;
    }
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
  Array.isArray(e) &&
  e.length === 4 &&
  Number.isSafeInteger(e[0]) &&
  e[0] >= 0 &&
  /^\d+$/.test(e[1]) &&
  /^\d+$/.test(e[2]) &&
  HEX64.test(e[3]);
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
export async function etagProvesContent(
  file: string,
  size: number,
  etag: string,
  signal?: AbortSignal,
): Promise<boolean> {
  const m = /^([0-9a-f]{32})(?:-(\d+))?$/.exec(etag);
  if (!m) return false;
  if (m[2] === undefined) return (await hashFile(file, signal, 'md5')) === m[1];
  const parts = Number(m[2]);
  const partSize = awsCliPartSize(size);
  if (Math.ceil(size / partSize) !== parts) return false;
  const partDigests: Buffer[] = [];
  let part = crypto.createHash('md5');
  let inPart = 0;
  await readRegular(
    file,
    (chunk) => {
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
    },
    signal,
  );
  if (inPart > 0) partDigests.push(part.digest());
  const combined = crypto.createHash('md5').update(Buffer.concat(partDigests)).digest('hex');
  return partDigests.length === parts && combined === m[1];
}

/** One file of a tree, as its hash cache remembers it: what it held, and the object that holds it. */
export interface TreeCacheLine {
  rel: string;
  size: number;
  mtimeNs: string;
  ino: string;
  sha256: string;
  /** The ETag of the object proven to hold these bytes: a listing that shows it proves them again. */
  etag?: string;
}

const isLine = (l: unknown): l is TreeCacheLine => {
  const x = l as TreeCacheLine;
  return (
    typeof x?.rel === 'string' &&
    Number.isSafeInteger(x.size) &&
    /^\d+$/.test(x.mtimeNs) &&
    /^\d+$/.test(x.ino) &&
    HEX64.test(x.sha256) &&
    (x.etag === undefined || typeof x.etag === 'string')
  );
};

/** A file's line still holds when its size, mtime and inode are the ones it was hashed with. */
export const lineMatches = (line: TreeCacheLine | undefined, st: FileStat) =>
  line !== undefined &&
  BigInt(line.size) === st.size &&
  line.mtimeNs === String(st.mtimeNs) &&
  line.ino === String(st.ino);

/**
 * A tree's hash cache, never held whole in memory: a file of JSON lines sorted by key, read as a
 * stream beside the walk (which comes in the same order, see walkSorted) and written anew as the
 * run goes. A line is written once its file is decided; files decide out of order (16 in flight),
 * so a bounded window waits for the slow one at its head, and past that window the head's line
 * is written from what is known then (a file being sent loses only its ETag: one HEAD next run).
 */
export class TreeCache {
  private lines?: AsyncIterator<string>;
  private current?: TreeCacheLine;
  /** `current` was returned by lookup: its file's caller settles the new line, so it is not kept as it was. */
  private handedOut = false;
  private previousRel?: string;
  private unsorted = false;
  private out?: fs.WriteStream;
  private tmp?: string;
  private writeError?: unknown;
  private nextSeq = 0;
  private readonly pending = new Map<number, { line?: TreeCacheLine; done: boolean }>();

  static readonly WINDOW = 10_000;

  private constructor(
    readonly file: string | undefined,
    /** Lines of an older whole-file cache (hashes-*.json), for the first run after an upgrade. */
    private readonly legacy?: Map<string, TreeCacheLine>,
    /**
     * Lines passed over by a lookup are kept (written through), not dropped: for a run that goes
     * by the bucket's listing (a restore), not by a walk, a line not looked up is a file it did
     * not meet, not a file that is gone. Such a run calls lookup before reserve, for each file.
     */
    private readonly keepPassedOver = false,
  ) {}

  /**
   * Opens the cache of a tree. `write: false` reads only (a dry run). `legacy` names an older
   * single-file cache and the tree's root in it, read once when the new file does not exist yet.
   */
  static async open(
    file: string | undefined,
    opts: { write: boolean; legacy?: { file: string; root: string; objectPrefix: string }; keepPassedOver?: boolean },
  ): Promise<TreeCache> {
    let legacy: Map<string, TreeCacheLine> | undefined;
    if (file && !fs.existsSync(file) && opts.legacy)
      legacy = readLegacy(opts.legacy.file, opts.legacy.root, opts.legacy.objectPrefix);
    const cache = new TreeCache(file, legacy, opts.keepPassedOver);
    if (file && fs.existsSync(file)) {
      try {
        const { handle } = await openRegular(file);
        const rl = readline.createInterface({ input: handle.createReadStream(), crlfDelay: Infinity });
        cache.lines = rl[Symbol.asyncIterator]();
      } catch {
        /* unreadable: hash again */
      }
    }
    if (file && opts.write) {
      try {
        fs.mkdirSync(path.dirname(file), { recursive: true, mode: 0o700 });
        cache.tmp = partialName(file);
        cache.out = fs.createWriteStream(cache.tmp, { flags: 'wx', mode: 0o600 });
        cache.out.on('error', (e) => (cache.writeError ??= e));
      } catch (e) {
        cache.writeError = e;
      }
    }
    return cache;
  }

  /** The remembered line of `rel`. Called in key order; lines of files no longer there are passed over. */
  async lookup(rel: string): Promise<TreeCacheLine | undefined> {
    if (this.legacy) return this.legacy.get(rel);
    while (this.lines && !this.unsorted) {
      if (this.current && compareKeys(this.current.rel, rel) >= 0) break;
      if (this.current && this.keepPassedOver && !this.handedOut) this.settle(this.reserve(), this.current);
      const next = await this.lines.next();
      if (next.done) {
        this.lines = undefined;
        this.current = undefined;
        break;
      }
      let line: unknown;
      try {
        line = JSON.parse(next.value);
      } catch {
        continue; // a damaged line: that file is hashed again
      }
      if (!isLine(line)) continue;
      // A file not sorted as expected is not trusted past that point.
      if (this.previousRel !== undefined && compareKeys(line.rel, this.previousRel) <= 0) this.unsorted = true;
      this.previousRel = line.rel;
      this.current = line;
      this.handedOut = false;
    }
    if (this.current?.rel !== rel) return undefined;
    this.handedOut = true;
    return this.current;
  }

  /** A place in the new cache for the next file of the walk. */
  reserve(): number {
    const seq = this.nextSeq++;
    this.pending.set(seq, { done: false });
    return seq;
  }

  /** What is known of a file before it is decided (its hash): written if the window forces it. */
  provisional(seq: number, line: TreeCacheLine | undefined) {
    const p = this.pending.get(seq);
    if (p && !p.done) p.line = line;
  }

  /** The file is decided: its final line (undefined: nothing to remember). */
  settle(seq: number, line: TreeCacheLine | undefined) {
    const p = this.pending.get(seq);
    if (!p) return;
    p.line = line;
    p.done = true;
    this.flush(false);
  }

  private writtenUpTo = 0;
  private flush(all: boolean) {
    while (this.pending.size) {
      const head = this.pending.get(this.writtenUpTo);
      if (!head) break;
      if (!head.done && !all && this.pending.size <= TreeCache.WINDOW) break;
      if (head.line && this.out && !this.writeError) this.out.write(JSON.stringify(head.line) + '\n');
      this.pending.delete(this.writtenUpTo++);
    }
  }

  /**
   * Writes what is left and puts the new cache in place. The old lines past the last file looked
   * up are kept after an early end (`complete` false: an interrupt, a fatal error), and always by
   * a run that keeps what it passes over; after a whole walk they are files gone, and dropped.
   * Returns a warning when the cache could not be written (a full disk): it costs only hashing again.
   */
  async finish(complete: boolean): Promise<string | undefined> {
    if (!this.out || !this.file || !this.tmp)
      return this.writeError
        ? `hash cache not written (${errorOf(this.writeError, this.file ?? 'the cache')})`
        : undefined;
    this.flush(true);
    const out = this.out;
    if (!this.legacy && this.lines && !this.unsorted && (this.keepPassedOver || !complete)) {
      if (this.current && !this.handedOut) out.write(JSON.stringify(this.current) + '\n');
      for (let next = await this.lines.next(); !next.done && !this.writeError; next = await this.lines.next()) {
        // A tail of a million lines is not buffered whole: wait for the disk (or its error).
        if (!out.write(next.value + '\n'))
          await new Promise<void>((resolve) => {
            const go = () => (out.off('drain', go), out.off('error', go), resolve());
            out.once('drain', go).once('error', go);
          });
      }
    }
    await new Promise<void>((resolve) => out.end(() => resolve()));
    try {
      if (this.writeError) throw this.writeError;
      const fd = fs.openSync(this.tmp, 'r');
      try {
        fs.fsyncSync(fd);
      } finally {
        fs.closeSync(fd);
      }
      fs.renameSync(this.tmp, this.file);
      return undefined;
    } catch (e) {
      fs.rmSync(this.tmp, { force: true });
      return `hash cache not saved (${errorOf(e, this.file)}): unchanged files will be hashed again next run`;
    }
  }
}

function errorOf(e: unknown, file: string): string {
  const err = e as NodeJS.ErrnoException;
  return err?.code ? `${err.code}: ${file}` : String((e as Error)?.message ?? e);
}

/** The lines of one tree from the older whole-file cache (keyed by absolute path, objects by bucket/key). */
function readLegacy(file: string, root: string, objectPrefix: string): Map<string, TreeCacheLine> | undefined {
  try {
    const data = JSON.parse(readRegularFileSync(file).toString('utf8')) as Partial<CacheFile>;
    if (data?.version !== 1) return undefined;
    const lines = new Map<string, TreeCacheLine>();
    const prefix = root.endsWith(path.sep) ? root : root + path.sep;
    for (const [p, e] of Object.entries(data.files ?? {})) {
      if (!p.startsWith(prefix) || !isFileEntry(e)) continue;
      const rel = p.slice(prefix.length).split(path.sep).join('/');
      const object = data.objects?.[objectPrefix + rel];
      const etag = isObjectEntry(object) && object[1] === e[3] ? object[0] : undefined;
      lines.set(rel, { rel, size: e[0], mtimeNs: e[1], ino: e[2], sha256: e[3], etag });
    }
    return lines;
  } catch {
    return undefined;
  }
}
