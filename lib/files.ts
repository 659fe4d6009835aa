// Local files: written under a temporary name and renamed once complete (no partial file ever
// stands under a final name), and trees walked without following symlinks.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { Transform, type Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';

/** The temporary name beside `file`: hidden, and named for the process that writes it. */
export function partialName(file: string): string {
  return path.join(path.dirname(file), `.${path.basename(file)}.partial-${process.pid}`);
}

export function writeFileAtomic(file: string, data: string | Buffer, mode = 0o644) {
  const tmp = partialName(file);
  try {
    fs.writeFileSync(tmp, data, { mode });
    fs.chmodSync(tmp, mode); // umask may have narrowed it
    fs.renameSync(tmp, file);
  } catch (e) {
    fs.rmSync(tmp, { force: true });
    throw e;
  }
}

export interface Written {
  bytes: number;
  sha256: string;
}

/**
 * Streams into `file` through a temporary name: fsync, then rename. On any error or abort the
 * temporary file is removed and the old `file`, if any, is untouched.
 */
export async function writeStreamAtomic(file: string, source: Readable, mode: number, signal?: AbortSignal): Promise<Written> {
  const tmp = partialName(file);
  const hash = crypto.createHash('sha256');
  let bytes = 0;
  const tap = new Transform({
    transform(chunk: Buffer, _enc, cb) {
      hash.update(chunk);
      bytes += chunk.length;
      cb(null, chunk);
    },
  });
  try {
    const out = fs.createWriteStream(tmp, { mode, flags: 'wx' });
    await pipeline(source, tap, out, { signal });
    const fd = fs.openSync(tmp, 'r');
    try {
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.chmodSync(tmp, mode);
    fs.renameSync(tmp, file);
  } catch (e) {
    source.destroy();
    fs.rmSync(tmp, { force: true });
    throw e;
  }
  return { bytes, sha256: hash.digest('hex') };
}

/** A directory that holds secrets: created 0700, and narrowed to 0700 if it was wider. */
export function ensurePrivateDir(dir: string) {
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  fs.chmodSync(dir, 0o700);
}

export interface WalkedFile {
  path: string;
  /** Relative to the root, with `/` separators: the object key below the prefix. */
  rel: string;
  stat: fs.BigIntStats;
}

export interface WalkResult {
  files: WalkedFile[];
  /** Symlinks met and not followed, relative paths. */
  symlinks: string[];
  /** Entries that could not be read, with why. */
  unreadable: { rel: string; error: string }[];
}

/** Every regular file under `root`, sorted by relative path; symlinks are never followed. */
export async function walkTree(root: string): Promise<WalkResult> {
  const result: WalkResult = { files: [], symlinks: [], unreadable: [] };
  const visit = async (dir: string, relDir: string) => {
    let entries: fs.Dirent[];
    try {
      entries = await fs.promises.readdir(dir, { withFileTypes: true });
    } catch (e) {
      result.unreadable.push({ rel: relDir || '.', error: (e as NodeJS.ErrnoException).code ?? String(e) });
      return;
    }
    // A directory's entries at once: thousands of outputs in one folder are common.
    await Promise.all(
      entries.map(async (entry) => {
        const full = path.join(dir, entry.name);
        const rel = relDir ? `${relDir}/${entry.name}` : entry.name;
        if (entry.isSymbolicLink()) result.symlinks.push(rel);
        else if (entry.isDirectory()) await visit(full, rel);
        else if (entry.isFile()) {
          try {
            result.files.push({ path: full, rel, stat: await fs.promises.lstat(full, { bigint: true }) });
          } catch (e) {
            result.unreadable.push({ rel, error: (e as NodeJS.ErrnoException).code ?? String(e) });
          }
        }
        // sockets, fifos and devices are not user files: passed over
      }),
    );
  };
  await visit(root, '');
  const byRel = (a: string, b: string) => (a < b ? -1 : a > b ? 1 : 0);
  result.files.sort((a, b) => byRel(a.rel, b.rel));
  result.symlinks.sort(byRel);
  return result;
}
