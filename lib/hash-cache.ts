// Content identity without rereading: the sha256 of a file is remembered by path, size, mtime,
// ctime and inode, so an unchanged file is never read again. The ctime is what makes "unchanged"
// safe (as git and restic use it): an edit that keeps the size and puts the mtime back (touch -r,
// a restore tool, a clock set back) still moves the ctime, which no user can set. A tree's cache
// also remembers what each bucket object was proven to hold (its ETag), so an unchanged rerun
// needs only listings.
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
  withPath,
  writeFileAtomic,
} from './files.ts';
import { errorText } from './cli.ts';
import { fingerprintFile } from './storage.ts';

export { hashFile };

type FileEntry = [size: number, mtimeNs: string, ctimeNs: string, ino: string, sha256: string];

/** What a cache line is checked against: an lstat with bigint times (fs.BigIntStats is one). */
export interface FileStat {
  size: bigint;
  mtimeNs: bigint;
  ctimeNs: bigint;
  ino: bigint;
}

/**
 * The sha256 of a few files of Mello's own, by path (BACKUP_DIR's worker image and archives,
 * which rotation, --status and the restore check): one small JSON file in COMFYMULTI_STATE_DIR.
 * A tree's files are remembered by TreeCache, below, in key order.
 */
export class FileDigests {
  private dirty = false;
  /** Files read to learn their sha256 (the others were known). */
  hashed = 0;

  private constructor(
    readonly file: string,
    private readonly files: Record<string, FileEntry>,
  ) {}

  /** Loads it; a missing or unreadable one starts empty, an entry of another shape is dropped. */
  static load(file: string): FileDigests {
    const files: Record<string, FileEntry> = {};
    try {
      const parsed = JSON.parse(readRegularFileSync(file).toString('utf8')) as { files?: Record<string, unknown> };
      for (const [k, e] of Object.entries(parsed?.files ?? {})) if (isFileEntry(e)) files[k] = e;
    } catch {
      /* first run, or a damaged file: hash again */
    }
    return new FileDigests(file, files);
  }

  /** The file's sha256, read only when its size, mtime, ctime or inode changed. */
  async sha256(file: string, st: FileStat, signal?: AbortSignal): Promise<string> {
    const e = this.files[file];
    const same = [String(st.size), String(st.mtimeNs), String(st.ctimeNs), String(st.ino)];
    if (e && [String(e[0]), e[1], e[2], e[3]].every((v, i) => v === same[i])) return e[4];
    const fp = await fingerprintFile(file, signal);
    this.hashed++;
    this.files[file] = [fp.size, String(fp.mtimeNs), String(fp.ctimeNs), String(fp.ino), fp.sha256];
    this.dirty = true;
    return fp.sha256;
  }

  /**
   * Saves it; one that cannot be written (a full disk) costs only hashing again next time, so it
   * is a warning naming the file, never a failure of the work that was done.
   */
  trySave(): string | undefined {
    if (!this.dirty) return undefined;
    try {
      fs.mkdirSync(path.dirname(this.file), { recursive: true, mode: 0o700 });
      writeFileAtomic(this.file, JSON.stringify({ version: 2, files: this.files }), 0o600);
      this.dirty = false;
      return undefined;
    } catch (e) {
      return `hash cache not saved (${errorText(withPath(e, this.file))}): unchanged files will be hashed again next run`;
    }
  }
}

const HEX64 = /^[0-9a-f]{64}$/;
const isFileEntry = (e: unknown): e is FileEntry =>
  Array.isArray(e) &&
  e.length === 5 &&
  Number.isSafeInteger(e[0]) &&
  e[0] >= 0 &&
  /^\d+$/.test(e[1]) &&
  /^\d+$/.test(e[2]) &&
  /^\d+$/.test(e[3]) &&
  HEX64.test(e[4]);

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
  const check = new EtagCheck(size, etag);
  if (!check.possible) return false;
  await readRegular(file, (chunk) => check.update(chunk), signal);
  return check.proves();
}

/**
 * Whether bytes fed in order are the ones an ETag names (see etagProvesContent): for a file read
 * from disk, or an object read back (restore-mello's drill of a bash-era upload).
 */
export class EtagCheck {
  private readonly md5?: string;
  private readonly parts?: number;
  private readonly partSize: number;
  private readonly partDigests: Buffer[] = [];
  private part = crypto.createHash('md5');
  private inPart = 0;
  private bytes = 0;
  /** False when no bytes can match: not an MD5 ETag, or a part count aws-cli would not have made. */
  readonly possible: boolean;

  constructor(
    private readonly size: number,
    etag: string,
  ) {
    const m = /^([0-9a-f]{32})(?:-(\d+))?$/.exec(etag);
    this.md5 = m?.[1];
    this.parts = m?.[2] === undefined ? undefined : Number(m[2]);
    // A single-part upload's ETag is the MD5 of the whole: one part of any size.
    this.partSize = this.parts === undefined ? Infinity : awsCliPartSize(size);
    this.possible = Boolean(m) && (this.parts === undefined || Math.ceil(size / this.partSize) === this.parts);
  }

  update(chunk: Buffer) {
    this.bytes += chunk.length;
    let offset = 0;
    while (offset < chunk.length) {
      const take = Math.min(chunk.length - offset, this.partSize - this.inPart);
      this.part.update(chunk.subarray(offset, offset + take));
      offset += take;
      this.inPart += take;
      if (this.inPart === this.partSize) {
        this.partDigests.push(this.part.digest());
        this.part = crypto.createHash('md5');
        this.inPart = 0;
      }
    }
  }

  proves(): boolean {
    if (!this.possible || this.bytes !== this.size) return false;
    if (this.parts === undefined) return this.part.digest('hex') === this.md5;
    if (this.inPart > 0) this.partDigests.push(this.part.digest());
    const combined = crypto.createHash('md5').update(Buffer.concat(this.partDigests)).digest('hex');
    return this.partDigests.length === this.parts && combined === this.md5;
  }
}

/** One file of a tree, as its hash cache remembers it: what it held, and the object that holds it. */
export interface TreeCacheLine {
  rel: string;
  size: number;
  mtimeNs: string;
  /**
   * The ctime the file had when it was hashed. A line without one (written before it was
   * recorded) still names the object proven to hold its sha256, but never vouches for the file.
   */
  ctimeNs?: string;
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
    (x.ctimeNs === undefined || /^\d+$/.test(x.ctimeNs)) &&
    /^\d+$/.test(x.ino) &&
    HEX64.test(x.sha256) &&
    (x.etag === undefined || typeof x.etag === 'string')
  );
};

/**
 * A file's line still holds when its size, mtime, ctime and inode are the ones it was hashed
 * with. The ctime catches what the others miss: an edit of the same size whose mtime was put back.
 */
export const lineMatches = (line: TreeCacheLine | undefined, st: FileStat) =>
  line !== undefined &&
  line.ctimeNs !== undefined &&
  BigInt(line.size) === st.size &&
  line.mtimeNs === String(st.mtimeNs) &&
  line.ctimeNs === String(st.ctimeNs) &&
  line.ino === String(st.ino);

/** The line that remembers a file's sha256 by the stat it had when it was hashed. */
export const lineOf = (
  rel: string,
  st: Omit<FileStat, 'size'> & { size: bigint | number },
  sha256: string,
  etag?: string,
): TreeCacheLine => ({
  rel,
  size: Number(st.size),
  mtimeNs: String(st.mtimeNs),
  ctimeNs: String(st.ctimeNs),
  ino: String(st.ino),
  sha256,
  etag,
});

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
    /**
     * Lines passed over by a lookup are kept (written through), not dropped: for a run that goes
     * by the bucket's listing (a restore), not by a walk, a line not looked up is a file it did
     * not meet, not a file that is gone. Such a run calls lookup before reserve, for each file.
     */
    private readonly keepPassedOver = false,
  ) {}

  /** Opens the cache of a tree. `write: false` reads only (a dry run). */
  static async open(file: string | undefined, opts: { write: boolean; keepPassedOver?: boolean }): Promise<TreeCache> {
    const cache = new TreeCache(file, opts.keepPassedOver);
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
        ? `hash cache not written (${errorText(withPath(this.writeError, this.file ?? 'the cache'))})`
        : undefined;
    this.flush(true);
    const out = this.out;
    if (this.lines && !this.unsorted && (this.keepPassedOver || !complete)) {
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
      return `hash cache not saved (${errorText(withPath(e, this.file))}): unchanged files will be hashed again next run`;
    }
  }
}
