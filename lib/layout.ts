// What each config archive may hold: the SPEC's layouts ("Trust between the machines"), enforced
// here and only here. Verda runs the workshop users' code, so its tar stream is data: every
// archive passes through a TarGuard, at backup as it arrives from Verda, and again before any
// restore, drill or verify unpacks it. The guard reads the tar format block by block (ustar, GNU
// long names, pax headers), lets through only the entries of its kind's layout, and fails naming
// the first entry that is not (in the identity kinds) or leaves a device or FIFO out with a
// warning (home-dev, comfy-project, where anything else of the tree belongs). No absolute name,
// no `..`, no hard link to a name that is not earlier in the archive, no entry beneath a symlink
// of the same archive: so tar, unpacking into a fresh directory, cannot be led out of it.
import crypto from 'node:crypto';
import { Transform, Writable, type TransformCallback } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import zlib from 'node:zlib';
import tar from 'tar-stream';
import { printable } from './cli.ts';
import { datedPattern } from './dated.ts';
import { openRegular, showBytes } from './files.ts';

export type EntryType = 'file' | 'directory' | 'symlink' | 'hardlink' | 'device' | 'fifo';

interface Layout {
  /** Whether an entry of this path (components, `.` and empty ones dropped) and type belongs here. */
  allows(parts: string[], type: EntryType): boolean;
  /** home-dev and comfy-project: symlinks kept (restored as links), devices and FIFOs left out. */
  tree: boolean;
  /**
   * The files an archive of this kind exists for: one that exists on Verda and cannot be read
   * fails the step (an identity archive without the identity is never reported as made).
   */
  essential?: (parts: string[]) => boolean;
}

const is = (parts: string[], ...want: string[]) => parts.length === want.length && want.every((w, i) => parts[i] === w);
const under = (parts: string[], ...top: string[]) => parts.length >= top.length && top.every((w, i) => parts[i] === w);
const fileOrDir = (type: EntryType) => type === 'file' || type === 'directory' || type === 'hardlink';
const file = (type: EntryType) => type === 'file' || type === 'hardlink';

/** The layouts of the SPEC's table, by kind. */
const LAYOUTS: Record<string, Layout> = {
  'tailscale-identity': {
    allows: (p, t) => under(p, 'tailscale') && fileOrDir(t),
    tree: false,
    essential: (p) => is(p, 'tailscale') || is(p, 'tailscale', 'tailscaled.state'),
  },
  'ssh-host-keys': {
    allows: (p, t) => p.length === 3 && under(p, 'etc', 'ssh') && p[2].startsWith('ssh_host_') && file(t),
    tree: false,
    essential: (p) => p.length === 3 && under(p, 'etc', 'ssh') && /^ssh_host_.*_key$/.test(p[2]),
  },
  fail2ban: {
    allows: (p, t) =>
      (is(p, 'etc', 'fail2ban', 'jail.local') && file(t)) || (under(p, 'etc', 'fail2ban', 'jail.d') && fileOrDir(t)),
    tree: false,
  },
  ufw: {
    allows: (p, t) =>
      (is(p, 'etc', 'ufw', 'user.rules') || is(p, 'etc', 'ufw', 'user6.rules') || is(p, 'lib', 'ufw', 'user.rules')) &&
      file(t),
    tree: false,
    essential: (p) => is(p, 'etc', 'ufw', 'user.rules') || is(p, 'etc', 'ufw', 'user6.rules'),
  },
  'project-env': { allows: (p, t) => is(p, '.env') && file(t), tree: false, essential: (p) => is(p, '.env') },
  'home-dev': { allows: () => true, tree: true },
  'comfy-project': { allows: () => true, tree: true },
  'ohmyzsh-custom': { allows: (p, t) => under(p, 'custom') && fileOrDir(t), tree: false },
};

/** The config kinds, in the SPEC's order. */
export const CONFIG_KINDS = Object.keys(LAYOUTS);

/** The kind of a dated config archive's name (`ufw-20260101-120000.tar.gz` → `ufw`), or undefined. */
export const archiveKind = (name: string) => CONFIG_KINDS.find((kind) => datedPattern(kind, 'tar.gz').test(name));

function layoutOf(kind: string): Layout {
  const layout = LAYOUTS[kind];
  if (!layout) throw new Error(`no layout for archive kind ${kind}`); // a bug: every kind has one
  return layout;
}

/** Whether a file tar names (relative to its base, as it printed it) is one the kind exists for. */
export function isEssential(kind: string, name: string): boolean {
  const parts = name.split('/').filter((p) => p && p !== '.');
  return layoutOf(kind).essential?.(parts) ?? false;
}

/** An archive that holds what its kind may not: the step fails, naming the entry. */
export class LayoutError extends Error {}

/** Everything unpacked in a run, counted as it goes (the drill's DRILL_MAX_BYTES). */
export class ByteBudget {
  used = 0;
  constructor(
    readonly limit: number,
    private readonly variable: string,
  ) {}
  take(bytes: number) {
    this.used += bytes;
    if (this.used > this.limit)
      throw new LayoutError(`more than ${this.variable} (${this.limit} bytes) to unpack: stopped`);
  }
}

const BLOCK = 512;
/** The longest name or pax header a guard accepts: far above PATH_MAX, bounded all the same. */
const META_LIMIT = 64 * 1024;
const ZERO_BLOCK = Buffer.alloc(BLOCK);

/** A number field of a tar header: octal text, or GNU's base-256 (first byte's high bit set) for big values. */
function numberField(field: Buffer, what: string): number {
  if (field[0] & 0x80) {
    if (field[0] === 0xff) throw new LayoutError(`a negative ${what} in a tar header`);
    let n = field[0] & 0x7f;
    for (let i = 1; i < field.length; i++) n = n * 256 + field[i];
    if (!Number.isSafeInteger(n)) throw new LayoutError(`a ${what} too large in a tar header`);
    return n;
  }
  const text = field
    .toString('latin1')
    .replace(/[\0 ]+$/, '')
    .replace(/^ +/, '');
  if (text === '') return 0;
  if (!/^[0-7]+$/.test(text)) throw new LayoutError(`a ${what} that is not a number in a tar header`);
  return parseInt(text, 8);
}

/** A NUL-terminated header field, as bytes. */
const cString = (field: Buffer) => {
  const nul = field.indexOf(0);
  return nul < 0 ? field : field.subarray(0, nul);
};

/** The pax records `LEN key=value\n` of an extended header. */
function paxRecords(data: Buffer): Map<string, Buffer> {
  const records = new Map<string, Buffer>();
  for (let at = 0; at < data.length && data[at] !== 0;) {
    const space = data.indexOf(0x20, at);
    const len = space > at ? Number(data.toString('latin1', at, space)) : NaN;
    if (!Number.isInteger(len) || len <= space - at || at + len > data.length || data[at + len - 1] !== 0x0a)
      throw new LayoutError('a malformed pax header');
    const record = data.subarray(space + 1, at + len - 1);
    const eq = record.indexOf(0x3d);
    if (eq < 0) throw new LayoutError('a malformed pax header');
    records.set(record.toString('latin1', 0, eq), record.subarray(eq + 1));
    at += len;
  }
  return records;
}

const TYPES: Record<string, EntryType> = {
  '0': 'file',
  '\0': 'file',
  '7': 'file',
  '1': 'hardlink',
  '2': 'symlink',
  '3': 'device',
  '4': 'device',
  '5': 'directory',
  '6': 'fifo',
};

/** A name as the admin reads it: bytes that are not UTF-8 as `\xNN`, control characters escaped. */
const shown = (name: Buffer) => printable(showBytes(name));

export interface GuardResult {
  /** Entries let through. */
  entries: number;
  /** Entries left out (a device or FIFO in home-dev or comfy-project), each a warning naming it. */
  dropped: string[];
}

/**
 * A tar stream in, the same tar stream out, minus what home-dev and comfy-project may not hold
 * (devices, FIFOs), ended by exactly one end-of-archive marker. Anything outside the kind's layout,
 * any name that would leave the directory it is unpacked into, any entry type it does not know
 * and any malformed header fails the stream with a LayoutError naming the entry. Bytes are passed
 * on as they come, never held but for an entry's headers.
 */
export class TarGuard extends Transform {
  readonly result: GuardResult = { entries: 0, dropped: [] };
  private readonly layout: Layout;
  /** Bytes of the current header (or metadata block) gathered so far. */
  private header = Buffer.alloc(0);
  /** Headers of the entry being read (GNU long names, pax), held until it is let through or left out. */
  private held: Buffer[] = [];
  /** Of the current entry's data (with padding): bytes still to pass or drop, and which. */
  private dataLeft = 0;
  private passData = true;
  /** A GNU long name or pax header being gathered, and its size. */
  private meta?: { type: string; size: number; chunks: Buffer[]; got: number };
  private longName?: Buffer;
  private longLink?: Buffer;
  private pax?: Map<string, Buffer>;
  private ended = false;
  /** Truncated sha256s of the files let through: a hard link may only point at one of them. */
  private readonly files = new Set<string>();
  private readonly symlinks = new Set<string>();

  constructor(
    readonly kind: string,
    private readonly budget?: ByteBudget,
  ) {
    super();
    this.layout = layoutOf(kind);
  }

  private pass(chunk: Buffer) {
    this.budget?.take(chunk.length);
    this.push(chunk);
  }

  _transform(chunk: Buffer, _encoding: BufferEncoding, done: TransformCallback) {
    try {
      let at = 0;
      while (at < chunk.length) {
        if (this.ended) {
          // After the end marker GNU tar pads with zeros to its record size; anything else is a
          // second archive that some readers would unpack and others not.
          const rest = chunk.subarray(at);
          if (rest.some((b) => b !== 0)) throw new LayoutError('data after the end of the archive');
          break;
        }
        if (this.dataLeft > 0) {
          const take = Math.min(this.dataLeft, chunk.length - at);
          const piece = chunk.subarray(at, at + take);
          if (this.meta) this.gatherMeta(piece);
          else if (this.passData) this.pass(piece);
          this.dataLeft -= take;
          at += take;
          if (this.dataLeft === 0 && this.meta) this.endMeta();
          continue;
        }
        const take = Math.min(BLOCK - this.header.length, chunk.length - at);
        this.header = Buffer.concat([this.header, chunk.subarray(at, at + take)]);
        at += take;
        if (this.header.length === BLOCK) {
          const block = this.header;
          this.header = Buffer.alloc(0);
          this.onHeader(block);
        }
      }
      done();
    } catch (e) {
      done(e as Error);
    }
  }

  _flush(done: TransformCallback) {
    if (!this.ended) return done(new LayoutError('the archive ends before its end marker (truncated)'));
    done();
  }

  private gatherMeta(piece: Buffer) {
    const meta = this.meta!;
    this.held.push(piece);
    const useful = Math.max(0, Math.min(piece.length, meta.size - meta.got));
    if (useful) meta.chunks.push(piece.subarray(0, useful));
    meta.got += useful;
  }

  private endMeta() {
    const meta = this.meta!;
    this.meta = undefined;
    const data = Buffer.concat(meta.chunks);
    if (meta.type === 'L') this.longName = cString(data);
    else if (meta.type === 'K') this.longLink = cString(data);
    else this.pax = paxRecords(data);
  }

  private onHeader(block: Buffer) {
    if (block.equals(ZERO_BLOCK)) {
      if (this.held.length) throw new LayoutError('the archive ends inside an entry');
      this.ended = true;
      this.pass(Buffer.alloc(2 * BLOCK));
      return;
    }
    const sum = numberField(block.subarray(148, 156), 'checksum');
    let want = 0;
    for (let i = 0; i < BLOCK; i++) want += i >= 148 && i < 156 ? 0x20 : block[i];
    if (sum !== want) throw new LayoutError('a tar header with a bad checksum (not a tar stream, or damaged)');
    const typeFlag = String.fromCharCode(block[156]);
    const size = numberField(block.subarray(124, 136), 'size');
    const padded = Math.ceil(size / BLOCK) * BLOCK;
    if (typeFlag === 'L' || typeFlag === 'K' || typeFlag === 'x') {
      if (size > META_LIMIT) throw new LayoutError(`a tar name or pax header longer than ${META_LIMIT} bytes`);
      if ((typeFlag === 'L' && this.longName) || (typeFlag === 'K' && this.longLink) || (typeFlag === 'x' && this.pax))
        throw new LayoutError('two long-name headers for one entry');
      this.held.push(block);
      this.meta = { type: typeFlag, size, chunks: [], got: 0 };
      this.dataLeft = padded;
      if (padded === 0) this.endMeta();
      return;
    }
    // The entry's names: a pax path, a GNU long name, or the header's (with ustar's prefix).
    const ustar = block.toString('latin1', 257, 263) === 'ustar\0';
    const prefix = ustar ? cString(block.subarray(345, 500)) : Buffer.alloc(0);
    const short = cString(block.subarray(0, 100));
    const name =
      this.pax?.get('path') ??
      this.longName ??
      (prefix.length ? Buffer.concat([prefix, Buffer.from('/'), short]) : short);
    const link = this.pax?.get('linkpath') ?? this.longLink ?? cString(block.subarray(157, 257));
    const paxSize = this.pax?.get('size');
    const sparse = [...(this.pax?.keys() ?? [])].some((k) => k.startsWith('GNU.sparse.'));
    this.longName = this.longLink = this.pax = undefined;
    const dataSize = paxSize ? Number(paxSize.toString('latin1')) : size;
    if (!Number.isSafeInteger(dataSize) || dataSize < 0) throw new LayoutError(`${shown(name)}: a bad pax size`);

    const type = TYPES[typeFlag];
    const what = shown(name);
    if (!type || sparse)
      throw new LayoutError(
        `${what}: an entry of tar type ${JSON.stringify(typeFlag)}, which no archive of ours holds`,
      );
    if (type !== 'file' && dataSize !== 0) throw new LayoutError(`${what}: a ${type} entry that carries data`);
    const parts = this.pathParts(name, what);
    const key = parts.join('/');
    for (let i = 1; i < parts.length && this.symlinks.size; i++) {
      if (this.symlinks.has(parts.slice(0, i).join('/')))
        throw new LayoutError(
          `${what}: beneath ${shown(Buffer.from(parts.slice(0, i).join('/'), 'latin1'))}, a symlink of the same archive`,
        );
    }
    if ((type === 'device' || type === 'fifo') && this.layout.tree) {
      this.result.dropped.push(
        `${what}: a ${type === 'fifo' ? 'FIFO' : 'device'}, left out of the ${this.kind} archive`,
      );
      this.held = [];
      this.passData = false;
      this.dataLeft = 0;
      return;
    }
    if ((type === 'symlink' && !this.layout.tree) || !this.layout.allows(parts, type)) {
      throw new LayoutError(
        `${what}: ${type === 'symlink' || type === 'device' || type === 'fifo' ? `a ${type}, ` : ''}` +
          `not part of the ${this.kind} layout`,
      );
    }
    if (type === 'hardlink') {
      const target = this.pathParts(link, `${what} (a hard link to ${shown(link)})`).join('/');
      if (!this.files.has(digest(target)))
        throw new LayoutError(`${what}: a hard link to ${shown(link)}, which is not earlier in the archive`);
    }
    if (type === 'file') this.files.add(digest(key));
    // Never forgotten, even if a later entry of the same name replaces it: what tar does with a
    // directory entry over an existing symlink is not something to lean on.
    if (type === 'symlink') this.symlinks.add(key);
    this.result.entries++;
    for (const b of this.held) this.pass(b);
    this.held = [];
    this.pass(block);
    this.passData = true;
    this.dataLeft = Math.ceil(dataSize / BLOCK) * BLOCK;
  }

  /** A member name as path components: never absolute, never `..`. */
  private pathParts(name: Buffer, what: string): string[] {
    const text = name.toString('latin1');
    if (text.startsWith('/')) throw new LayoutError(`${what}: an absolute name`);
    const parts = text.split('/').filter((p) => p !== '' && p !== '.');
    if (parts.includes('..')) throw new LayoutError(`${what}: a name with ".."`);
    return parts;
  }
}

/** The entry names of a .tar.gz of any layout (an image archive), read as a stream: proof it is a whole tar. */
export async function listArchive(gzFile: string): Promise<string[]> {
  const names: string[] = [];
  const extract = tar.extract();
  extract.on('entry', (header, stream, next) => {
    names.push(header.name);
    stream.on('end', next);
    stream.resume();
  });
  const { handle } = await openRegular(gzFile);
  await pipeline(handle.createReadStream({ highWaterMark: 1 << 20 }), zlib.createGunzip(), extract);
  return names;
}

const digest = (key: string) => crypto.createHash('sha256').update(key, 'latin1').digest('base64').slice(0, 22);

/**
 * Checks a .tar.gz of a kind, reading it as a stream: whole, and only its layout. Returns what
 * the guard found (entries, devices or FIFOs it would leave out); throws a LayoutError naming the
 * first entry that does not belong, or the gzip or tar error of a damaged archive.
 */
export async function checkArchiveFile(gzFile: string, kind: string, signal?: AbortSignal): Promise<GuardResult> {
  const guard = new TarGuard(kind);
  const { handle } = await openRegular(gzFile);
  await pipeline(
    handle.createReadStream({ highWaterMark: 1 << 20 }),
    zlib.createGunzip(),
    guard,
    // The guard's output is not needed, only its checks.
    new Writable({ write: (_chunk, _encoding, next) => next() }),
    { signal },
  );
  return guard.result;
}
