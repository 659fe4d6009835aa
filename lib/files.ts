// Local files. Every file written is created exclusively under a temporary name (a symlink
// planted there is never followed), fsynced, then renamed: no partial file ever stands under a
// final name. Every file read is opened without blocking and must be a regular file (a FIFO
// never blocks a run). Trees are walked without following symlinks, with names read as bytes, so
// a name that is not UTF-8 is reported by what it is instead of vanishing as "ENOENT".
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { Transform, type Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import zlib from 'node:zlib';

const { O_WRONLY, O_RDONLY, O_CREAT, O_EXCL, O_NOFOLLOW, O_NONBLOCK } = fs.constants;

export const MiB = 1024 * 1024;

/** Files are checked block by block when read again for sending (see Fingerprint). */
export const BLOCK = 1 << 20;

/**
 * What a file held when it was read: its size and sha256, a crc32 of each BLOCK (so a later read
 * of any block-aligned range can be checked against it) and the stat it had. A file whose bytes
 * are sent is fingerprinted first; what is sent is checked against the fingerprint, so the
 * recorded sha256 is always the object's (lib/storage.ts `fingerprintedSource`).
 */
export interface Fingerprint {
  size: number;
  sha256: string;
  blockCrcs: number[];
  ino: bigint;
  mtimeNs: bigint;
  /** The status change time: a hash cache line trusts a file only while this is unchanged too (see lineMatches). */
  ctimeNs: bigint;
  /** The bytes themselves, for a file of at most one BLOCK: sent from memory, never read twice. */
  data?: Buffer;
}

/** sha256 and a crc32 per BLOCK of bytes fed in order. */
export class Digester {
  readonly hash = crypto.createHash('sha256');
  readonly blockCrcs: number[] = [];
  bytes = 0;
  private crc = 0;
  private inBlock = 0;

  update(chunk: Buffer) {
    this.hash.update(chunk);
    this.bytes += chunk.length;
    for (let at = 0; at < chunk.length;) {
      const take = Math.min(chunk.length - at, BLOCK - this.inBlock);
      this.crc = zlib.crc32(chunk.subarray(at, at + take), this.crc);
      at += take;
      this.inBlock += take;
      if (this.inBlock === BLOCK) this.endBlock();
    }
  }
  private endBlock() {
    this.blockCrcs.push(this.crc >>> 0);
    this.crc = 0;
    this.inBlock = 0;
  }
  finish(): { sha256: string; blockCrcs: number[]; bytes: number } {
    if (this.inBlock > 0) this.endBlock();
    return { sha256: this.hash.digest('hex'), blockCrcs: this.blockCrcs, bytes: this.bytes };
  }
}

/** An fs error as the admin needs it: with the file it concerns (a failed write names none). */
export function withPath<E>(e: E, file: string): E {
  const err = e as NodeJS.ErrnoException;
  if (err && typeof err === 'object' && err.code && !err.path) err.path = file;
  return e;
}

/** The temporary name beside `file`: hidden, named for the writing process, unpredictable. */
export function partialName(file: string): string {
  const tag = `${process.pid}-${crypto.randomBytes(4).toString('hex')}`;
  return path.join(path.dirname(file), `.${path.basename(file)}.partial-${tag}`);
}

const PARTIAL = /^\..+\.partial-(\d+)(?:-[0-9a-f]{8})?(?:\.candidate)?$/;

/** Whether a process with this pid exists (EPERM: it does, as another user's). */
export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * Removes temporary files a killed run (SIGKILL, power loss) left in `dir`: those whose writer is
 * gone. Returns their names. A writer that is alive (another script sharing the directory) is
 * left alone.
 */
export function removeStalePartials(dir: string): string[] {
  let names: string[];
  try {
    names = fs.readdirSync(dir);
  } catch {
    return [];
  }
  const removed: string[] = [];
  for (const name of names) {
    const m = PARTIAL.exec(name);
    if (!m || Number(m[1]) === process.pid || processAlive(Number(m[1]))) continue;
    try {
      if (fs.lstatSync(path.join(dir, name)).isDirectory()) continue;
      fs.unlinkSync(path.join(dir, name));
      removed.push(name);
    } catch {
      /* gone meanwhile */
    }
  }
  return removed;
}

/** Creates `tmp` for writing, exclusively, never through a symlink; `mode` whatever the umask. */
function createExclusive(tmp: string, mode: number): number {
  const fd = fs.openSync(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, mode);
  fs.fchmodSync(fd, mode);
  return fd;
}

export function writeFileAtomic(file: string, data: string | Buffer, mode = 0o644) {
  const tmp = partialName(file);
  let fd: number | undefined;
  try {
    fd = createExclusive(tmp, mode);
    fs.writeFileSync(fd, data);
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    fd = undefined;
    fs.renameSync(tmp, file);
  } catch (e) {
    if (fd !== undefined) fs.closeSync(fd);
    fs.rmSync(tmp, { force: true });
    throw withPath(e, file);
  }
}

/** What writeStreamAtomic wrote: its bytes and sha256, and its fingerprint for sending it. */
export interface Written {
  bytes: number;
  sha256: string;
  fingerprint: Fingerprint;
}

/**
 * A pass-through that shows each chunk to `see` (to hash it, count it): the one way a stream is
 * watched as it goes. An Error returned by `see` fails the stream with it.
 */
export function tap(see: (chunk: Buffer) => Error | void): Transform {
  return new Transform({
    transform(chunk: Buffer, _encoding, cb) {
      const problem = see(chunk);
      cb(problem ?? null, problem ? undefined : chunk);
    },
  });
}

/**
 * Streams into `file` through a temporary name: fsync, then rename. On any error or abort the
 * temporary file is removed and the old `file`, if any, is untouched.
 */
export async function writeStreamAtomic(
  file: string,
  source: Readable,
  mode: number,
  signal?: AbortSignal,
): Promise<Written> {
  const tmp = partialName(file);
  const digest = new Digester();
  try {
    // Created exclusively, never through a symlink; the stream owns the descriptor from here on
    // (it closes it on error too).
    const out = fs.createWriteStream(tmp, { fd: createExclusive(tmp, mode) });
    await pipeline(
      source,
      tap((chunk) => digest.update(chunk)),
      out,
      { signal },
    );
    const fd = fs.openSync(tmp, O_RDONLY | O_NOFOLLOW);
    let st: fs.BigIntStats;
    try {
      fs.fsyncSync(fd);
      st = fs.fstatSync(fd, { bigint: true });
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(tmp, file);
    const { sha256, blockCrcs, bytes } = digest.finish();
    // The ctime is the one before the rename (which sets it again): a line made from it would
    // only cost a read, never trust a file wrongly.
    const fingerprint = { size: bytes, sha256, blockCrcs, ino: st.ino, mtimeNs: st.mtimeNs, ctimeNs: st.ctimeNs };
    return { bytes, sha256, fingerprint };
  } catch (e) {
    source.destroy();
    fs.rmSync(tmp, { force: true });
    throw withPath(e, file);
  }
}

/** A directory that holds secrets: created 0700, and narrowed to 0700 if it was wider. */
export function ensurePrivateDir(dir: string) {
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  fs.chmodSync(dir, 0o700);
}

/** A file that is not a regular file where one was expected (a FIFO, a device, a directory). */
export class NotRegularFile extends Error {
  constructor(
    readonly file: string,
    what: string,
  ) {
    super(`${file} is not a regular file (${what}): not read`);
  }
}

/** What a stat says a path is, for a message: `a FIFO`, `a directory`, `a character device`. */
export function fileKind(st: fs.BigIntStats | fs.Stats): string {
  if (st.isFile()) return 'a regular file';
  if (st.isDirectory()) return 'a directory';
  if (st.isFIFO()) return 'a FIFO';
  if (st.isSocket()) return 'a socket';
  if (st.isCharacterDevice()) return 'a character device';
  if (st.isBlockDevice()) return 'a block device';
  if (st.isSymbolicLink()) return 'a symlink';
  return 'not a regular file';
}

/**
 * Opens a file for reading without ever blocking (O_NONBLOCK: a FIFO opens at once) and checks
 * it is a regular file. `follow: false` refuses a symlink (ELOOP).
 */
export async function openRegular(
  file: string,
  opts: { follow?: boolean } = {},
): Promise<{ handle: fs.promises.FileHandle; stat: fs.BigIntStats }> {
  const handle = await fs.promises.open(file, O_RDONLY | O_NONBLOCK | (opts.follow ? 0 : O_NOFOLLOW));
  try {
    const stat = await handle.stat({ bigint: true });
    if (!stat.isFile()) throw new NotRegularFile(file, fileKind(stat));
    return { handle, stat };
  } catch (e) {
    await handle.close();
    throw e;
  }
}

/** The same, synchronously: for small files read before any work (configuration, locks, ids). */
export function readRegularFileSync(file: string, opts: { follow?: boolean } = {}): Buffer {
  const fd = fs.openSync(file, O_RDONLY | O_NONBLOCK | (opts.follow ? 0 : O_NOFOLLOW));
  try {
    const st = fs.fstatSync(fd);
    if (!st.isFile()) throw new NotRegularFile(file, fileKind(st));
    return fs.readFileSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/** Whether `file` is a regular file (not following a symlink). */
export function isRegularFile(file: string): boolean {
  try {
    return fs.lstatSync(file).isFile();
  } catch {
    return false;
  }
}

/** Reads a regular file through `onChunk`, one BLOCK at a time, from a stream it opens itself. */
export async function readRegular(
  file: string,
  onChunk: (chunk: Buffer) => void,
  signal?: AbortSignal,
  follow = false,
): Promise<number> {
  const { handle } = await openRegular(file, { follow });
  try {
    const stream = handle.createReadStream({ highWaterMark: BLOCK, autoClose: false });
    let bytes = 0;
    for await (const chunk of stream as AsyncIterable<Buffer>) {
      if (signal?.aborted) throw signal.reason;
      onChunk(chunk);
      bytes += chunk.length;
    }
    return bytes;
  } finally {
    await handle.close();
  }
}

/** A hash of a regular file's bytes (sha256 unless told otherwise). */
export async function hashFile(file: string, signal?: AbortSignal, algorithm = 'sha256'): Promise<string> {
  const hash = crypto.createHash(algorithm);
  await readRegular(file, (c) => hash.update(c), signal);
  return hash.digest('hex');
}

interface WalkedFile {
  path: string;
  /** Relative to the root, with `/` separators: the object key below the prefix. */
  rel: string;
  stat: fs.BigIntStats;
}

export interface WalkResult {
  files: WalkedFile[];
  /** Symlinks met and not followed, relative paths. */
  symlinks: string[];
  /** Entries that could not be read or named, with why (a name that is not UTF-8, EACCES). */
  unreadable: { rel: string; error: string }[];
}

/** What the walk meets, in key order: a file (stat it when its turn comes), a symlink, a problem. */
export type WalkEntry =
  | { kind: 'file'; path: string; rel: string }
  | { kind: 'symlink'; rel: string }
  | { kind: 'unreadable'; rel: string; error: string };

/**
 * Orders keys as S3 lists them, by UTF-8 bytes (JavaScript compares UTF-16 code units, which
 * puts U+E000–U+FFFF after astral characters: the code point fix-up below undoes that).
 */
export function compareKeys(a: string, b: string): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) {
    let x = a.charCodeAt(i);
    let y = b.charCodeAt(i);
    if (x === y) continue;
    if (x >= 0xd800) x += x < 0xe000 ? 0x2000 : -0x800;
    if (y >= 0xd800) y += y < 0xe000 ? 0x2000 : -0x800;
    return x - y;
  }
  return a.length - b.length;
}

/** A name as bytes, shown with every byte that is not UTF-8 as `\xNN`. */
export function showBytes(name: Buffer): string {
  let out = '';
  for (let at = 0; at < name.length;) {
    let len = 1;
    const b = name[at];
    if (b >= 0xc2 && b <= 0xdf) len = 2;
    else if (b >= 0xe0 && b <= 0xef) len = 3;
    else if (b >= 0xf0 && b <= 0xf4) len = 4;
    const piece = name.subarray(at, at + len);
    if (b < 0x80 || (piece.length === len && Buffer.from(piece.toString('utf8'), 'utf8').equals(piece) && len > 1)) {
      out += piece.toString('utf8');
      at += len;
    } else {
      out += `\\x${b.toString(16).padStart(2, '0')}`;
      at += 1;
    }
  }
  return out;
}

const isUtf8 = (name: Buffer) => Buffer.from(name.toString('utf8'), 'utf8').equals(name);

/**
 * lstat with bigint times, through the callback API: per file on the sync's hot path, where
 * fs.promises costs several times as much (Node 20: 2,000 files 5 ms against 10-28 ms).
 */
export function lstatBig(file: string): Promise<fs.BigIntStats> {
  return new Promise((resolve, reject) => fs.lstat(file, { bigint: true }, (e, st) => (e ? reject(e) : resolve(st))));
}

/**
 * Every entry under `root` in the order S3 lists their keys, one directory in memory at a time:
 * a directory's entries are sorted by name, a subdirectory's as `name/`, which is where its keys
 * fall among its siblings' (`a-c` < `a/x`). Symlinks are never followed; FIFOs, sockets and
 * devices are passed over. A name that is not valid UTF-8 cannot be an S3 key: it is reported,
 * with its bad bytes shown. Files are not stat'ed here: the consumer does, when it takes them.
 */
export async function* walkSorted(root: string, relDir = ''): AsyncGenerator<WalkEntry> {
  const dir = relDir ? path.join(root, relDir) : root;
  let entries: fs.Dirent[];
  try {
    entries = (await fs.promises.readdir(Buffer.from(dir), {
      withFileTypes: true,
      encoding: 'buffer',
    })) as unknown as fs.Dirent[];
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' && relDir) return; // removed meanwhile: nothing to send
    yield { kind: 'unreadable', rel: relDir || '.', error: `cannot read the directory: ${code ?? String(e)}` };
    return;
  }
  const named: { name: string; sortKey: string; type: 'file' | 'dir' | 'link' | 'bad' }[] = [];
  for (const entry of entries) {
    const raw = entry.name as unknown as Buffer;
    if (!isUtf8(raw)) {
      named.push({ name: showBytes(raw), sortKey: showBytes(raw), type: 'bad' });
      continue;
    }
    const name = raw.toString('utf8');
    let type: 'file' | 'dir' | 'link' | 'other' = entry.isFile()
      ? 'file'
      : entry.isDirectory()
        ? 'dir'
        : entry.isSymbolicLink()
          ? 'link'
          : 'other';
    // Some filesystems give no type in a listing: ask lstat.
    if (
      type === 'other' &&
      !entry.isFIFO() &&
      !entry.isSocket() &&
      !entry.isBlockDevice() &&
      !entry.isCharacterDevice()
    ) {
      const st = await fs.promises.lstat(path.join(dir, name)).catch(() => undefined);
      type = st?.isFile() ? 'file' : st?.isDirectory() ? 'dir' : st?.isSymbolicLink() ? 'link' : 'other';
    }
    if (type !== 'other') named.push({ name, sortKey: type === 'dir' ? `${name}/` : name, type });
  }
  entries = [];
  named.sort((a, b) => compareKeys(a.sortKey, b.sortKey));
  for (const e of named) {
    const rel = relDir ? `${relDir}/${e.name}` : e.name;
    if (e.type === 'dir') yield* walkSorted(root, rel);
    else if (e.type === 'file') yield { kind: 'file', path: path.join(root, rel), rel };
    else if (e.type === 'link') yield { kind: 'symlink', rel };
    else
      yield {
        kind: 'unreadable',
        rel,
        error: 'the name is not valid UTF-8, which an S3 key must be: rename it to back it up',
      };
  }
}

/** The whole walk, stat'ed and collected: for small trees and tests (syncTree streams instead). */
export async function walkTree(root: string): Promise<WalkResult> {
  const result: WalkResult = { files: [], symlinks: [], unreadable: [] };
  for await (const e of walkSorted(root)) {
    if (e.kind === 'symlink') result.symlinks.push(e.rel);
    else if (e.kind === 'unreadable') result.unreadable.push({ rel: e.rel, error: e.error });
    else {
      const stat = await fs.promises.lstat(e.path, { bigint: true }).catch(() => undefined);
      if (stat?.isFile()) result.files.push({ path: e.path, rel: e.rel, stat });
    }
  }
  return result;
}
