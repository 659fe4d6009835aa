// The config archives of the SPEC's table, shared by backup-verda (Verda → Mello over SSH) and
// backup-cron (Verda → SFS, locally). Each is GNU tar run where the files are (so mode, owner
// and mtime are kept, and root-only files are read through sudo), streamed out, gzipped here and
// written under a temporary name. Its content identity is the sha256 of the uncompressed tar:
// two runs over unchanged files give the same one, whatever gzip does.
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { PassThrough, Transform, pipeline as chain } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import zlib from 'node:zlib';
import tar from 'tar-stream';
import type { Config } from './config.ts';
import { errorText, humanSize, printable } from './cli.ts';
import { LayoutError, TarGuard, checkArchiveFile, isEssential } from './layout.ts';
import { AGE_SUFFIX, encryptStream } from './age.ts';
import {
  ensurePrivateDir,
  isRegularFile,
  openRegular,
  partialName,
  tap,
  writeFileAtomic,
  writeStreamAtomic,
  type Written,
} from './files.ts';
import type { RunRecord } from './manifest.ts';
import { failedBefore, type Step } from './step.ts';
import { copyWarnings, datedPattern, newestLocal } from './dated.ts';
import { requireSfs } from './sfs.ts';
import { program } from './sh.ts';
import { CommandTimeout, OutputTooLarge, said, type Host } from './ssh.ts';
import { fingerprintedSource, type Backend } from './storage.ts';

export interface ArchiveSpec {
  /** The artifact kind: the file is `${kind}-T.tar.gz`. */
  kind: string;
  /** The step's name. */
  title: string;
  /** The directory tar runs in (`-C`): entries are relative to it. */
  base: string;
  /** Entries, relative to base; a trailing `*` is expanded there. Missing ones are left out. */
  entries: string[];
  /**
   * GNU tar `--exclude` patterns, matched as the bash original's were (tar's default: at any
   * depth, wildcards allowed): `.cache` drops `./.cache` and `./comfy-multi/.cache` alike.
   */
  excludes?: string[];
  /** Read through VERDA_SUDO (root-only sources). */
  sudo: boolean;
}

const sys = (cfg: Config, p: string) => path.join(cfg.verdaSysroot, p);

/** The SPEC's config artifacts, in its order. Layouts are what the restore script extracts. */
export function configArchives(cfg: Config): ArchiveSpec[] {
  return [
    {
      kind: 'tailscale-identity',
      title: 'Tailscale identity',
      base: sys(cfg, 'var/lib'),
      entries: ['tailscale'],
      sudo: true,
    },
    { kind: 'ssh-host-keys', title: 'SSH host keys', base: sys(cfg, '/'), entries: ['etc/ssh/ssh_host_*'], sudo: true },
    {
      kind: 'fail2ban',
      title: 'fail2ban config',
      base: sys(cfg, '/'),
      entries: ['etc/fail2ban/jail.local', 'etc/fail2ban/jail.d'],
      sudo: true,
    },
    {
      kind: 'ufw',
      title: 'ufw rules',
      base: sys(cfg, '/'),
      entries: ['etc/ufw/user.rules', 'etc/ufw/user6.rules', 'lib/ufw/user.rules'],
      sudo: true,
    },
    { kind: 'project-env', title: 'Project .env', base: cfg.verdaProjectDir, entries: ['.env'], sudo: false },
    {
      kind: 'home-dev',
      title: 'Home directory (dev)',
      base: cfg.verdaHome,
      entries: ['.'],
      excludes: [
        '.cache',
        '.local/share',
        '.npm',
        '.docker',
        'comfy-multi/data/models',
        'comfy-multi/data/outputs',
        '*.safetensors',
      ],
      sudo: false,
    },
    {
      kind: 'comfy-project',
      title: 'ComfyUI project',
      base: cfg.verdaProjectDir,
      entries: ['.'],
      excludes: ['data/models', 'data/outputs', 'node_modules', '__pycache__'],
      sudo: false,
    },
    {
      kind: 'ohmyzsh-custom',
      title: 'oh-my-zsh custom',
      base: path.join(cfg.verdaHome, '.oh-my-zsh'),
      entries: ['custom'],
      sudo: false,
    },
  ];
}

/** The five archives backup-cron keeps on SFS. */
export const CRON_KINDS = ['tailscale-identity', 'ssh-host-keys', 'fail2ban', 'ufw', 'project-env'];

interface ArchiveResult extends Written {
  /** sha256 of the uncompressed tar: equal for equal content. */
  contentSha256: string;
  /** Entries that were found and archived. */
  entries: string[];
  /** tar's own warnings (a file changed while read). */
  warnings: string[];
}

class ArchiveError extends Error {}

/**
 * Which of the spec's entries exist on the host. A source that exists and cannot be read (the
 * base directory, or the directory of the host keys, without root) fails: it is not "missing".
 */
async function presentEntries(host: Host, spec: ArchiveSpec, signal?: AbortSignal): Promise<string[]> {
  const r = await host.$({ sudo: spec.sudo, signal })`sh -c ${program('present')} present ${spec.base} ${spec.entries}`;
  const records = r.stdout.split('\0').filter(Boolean);
  const unreadable = records.find((x) => x.startsWith('U'));
  if (unreadable) {
    const dir = path.join(spec.base, unreadable.slice(1));
    throw new ArchiveError(`${printable(dir)} exists on ${host.label} and cannot be read: ${unreadableHint(spec)}`);
  }
  return records
    .filter((x) => x.startsWith('P'))
    .map((x) => x.slice(1))
    .sort();
}

/** What to do about a source that cannot be read. */
const unreadableHint = (spec: ArchiveSpec) =>
  spec.sudo
    ? `the ${spec.kind} archive would not hold it (run as root, or set VERDA_SUDO to a sudo that works there)`
    : `the ${spec.kind} archive would not hold it`;

/** tar in the C locale: its messages are read (which files it could not read), so they must be English. */
function tarCommand(spec: ArchiveSpec, entries: string[]): string[] {
  return [
    'env',
    'LC_ALL=C',
    'tar',
    '--create',
    '--file=-',
    `--directory=${spec.base}`,
    '--sort=name',
    ...(spec.excludes ?? []).map((p) => `--exclude=${p}`),
    '--',
    ...entries,
  ];
}

// GNU tar's messages (C locale) about one file it could not read, or that changed as it read it:
// the archive holds everything else. Any other message (a missing base, a write error, "not
// recoverable") is fatal.
const TAR_FILE_PROBLEM =
  /^tar: (.*): (Cannot (?:open|stat|read|readlink|savedir|opendir|close)|Read error|File shrank|file changed as we read it|file removed before we read it|socket ignored)(?:[^:]*)?(?:: (.*))?$/;
const TAR_EXIT_LINE = /^tar: Exiting with failure status due to previous errors$/;

/**
 * What tar said, sorted: files it could not read (each a warning naming it), and whether
 * anything else went wrong (then the archive is not to be trusted).
 */
export function readTarMessages(stderr: string): {
  fileProblems: string[];
  other: string[];
  /** The files named by the problems that left them out of the archive (not the changed ones). */
  leftOut: string[];
} {
  const fileProblems: string[] = [];
  const other: string[] = [];
  const leftOut: string[] = [];
  for (const line of stderr.split('\n').filter(Boolean)) {
    const m = TAR_FILE_PROBLEM.exec(line);
    if (m) {
      const missing = /^Cannot/.test(m[2]);
      fileProblems.push(`${m[1]}: ${m[2]}${m[3] ? ` (${m[3]})` : ''}${missing ? ': not in the archive' : ''}`);
      if (missing) leftOut.push(m[1]);
    } else if (!TAR_EXIT_LINE.test(line)) other.push(line);
  }
  return { fileProblems, other, leftOut };
}

/** The first 512 bytes of a tar stream say `ustar` at 257: `save --help` text does not. */
const looksLikeTar = (header: Buffer) =>
  header.length >= 512 && header.subarray(257, 262).toString('latin1') === 'ustar';

/**
 * Runs a command on the host and gzips its stdout into `file` through a temporary name. The
 * file gets its final name only when the command exited with one of `okCodes`; otherwise, or
 * on abort, the temporary file is removed and an older `file` stands.
 */
export async function commandToGzipFile(
  host: Host,
  argv: string[],
  file: string,
  opts: {
    sudo?: boolean;
    signal?: AbortSignal;
    level?: number;
    okCodes?: number[];
    hashContent?: boolean;
    /** The output must be a tar stream (an image save): anything else is refused, the old file kept. */
    expectTar?: boolean;
    /** A config archive: its tar stream passes through this guard (its kind's layout) before gzip. */
    guard?: TarGuard;
    /** Whether a failing exit code is still a whole archive (tar's per-file read errors). */
    acceptFailure?: (code: number, stderr: string) => boolean;
  } = {},
): Promise<Written & { contentSha256?: string; code: number; stderr: string }> {
  const content = opts.hashContent ? crypto.createHash('sha256') : undefined;
  const raw = new PassThrough({ highWaterMark: 1 << 20 });
  let header = Buffer.alloc(0);
  const tap = new Transform({
    transform(chunk: Buffer, _e, cb) {
      content?.update(chunk);
      if (opts.expectTar && header.length < 512) {
        header = Buffer.concat([header, chunk.subarray(0, 512 - header.length)]);
        if (header.length === 512 && !looksLikeTar(header)) {
          return cb(
            new ArchiveError(
              `${argv.join(' ')} on ${host.label} did not give a tar stream: refused, the previous copy kept`,
            ),
          );
        }
      }
      cb(null, chunk);
    },
    flush(cb) {
      if (opts.expectTar && !looksLikeTar(header)) {
        return cb(
          new ArchiveError(
            `${argv.join(' ')} on ${host.label} did not give a tar stream: refused, the previous copy kept`,
          ),
        );
      }
      cb();
    },
  });
  // Joined with pipeline, not .pipe(): the command failing (raw destroyed) must fail the write,
  // and the write failing (disk full, the guard refusing an entry) must destroy raw, which stops
  // the command. The content hash is taken after the guard: it is what the archive holds.
  const gzip = zlib.createGzip({ level: opts.level ?? 6 });
  const gzipped = opts.guard ? chain(raw, opts.guard, tap, gzip, () => {}) : chain(raw, tap, gzip, () => {});
  const writing = writeStreamAtomic(file, gzipped, 0o600, opts.signal);
  writing.catch(() => {}); // awaited below; a failure must not surface as unhandled first
  let result;
  try {
    result = await host.$({ sudo: opts.sudo, signal: opts.signal, into: raw, nothrow: true })`${argv}`;
  } catch (e) {
    raw.destroy(e as Error);
    await writing.catch(() => {});
    throw e;
  }
  // The guard may have refused what the command sent while it ran to its end: that is the error.
  if (opts.guard?.errored) {
    await writing.catch(() => {});
    throw opts.guard.errored;
  }
  if (!(opts.okCodes ?? [0]).includes(result.code) && !opts.acceptFailure?.(result.code, result.stderr)) {
    const what = argv
      .filter((a) => !/^(env|LC_ALL=C)$/.test(a))
      .slice(0, 2)
      .join(' ');
    const error = new ArchiveError(`${what} on ${host.label} failed (exit ${result.code}): ${said(result.stderr)}`);
    raw.destroy(error);
    await writing.catch(() => {});
    throw error;
  }
  raw.end();
  const written = await writing;
  return { ...written, contentSha256: content?.digest('hex'), code: result.code, stderr: result.stderr };
}

/**
 * Archives the spec's present entries on `host` into `file` (gzipped, mode 0600), through a
 * temporary name. Returns undefined when none of its entries exist. With `unlessSameAs`, an
 * archive whose content equals that file's is not written (the temporary file is removed).
 */
async function writeArchive(
  host: Host,
  spec: ArchiveSpec,
  file: string,
  opts: { signal?: AbortSignal; unlessSameAs?: string } = {},
): Promise<(ArchiveResult & { written: boolean }) | undefined> {
  const entries = await presentEntries(host, spec, opts.signal);
  if (!entries.length) return undefined;
  const target = opts.unlessSameAs ? partialName(file) + '.candidate' : file;
  const guard = new TarGuard(spec.kind);
  // GNU tar: exit 1 = a file changed while being read (the archive is usable); exit 2 with only
  // per-file read errors (a root-owned 0600 file a container wrote) = the archive holds the rest,
  // and each such file is a warning naming it, unless it is one the kind exists for (the
  // Tailscale state, a host key, the .env): then the archive is no backup, and is not kept. Any
  // other exit 2 is fatal.
  const r = await commandToGzipFile(host, tarCommand(spec, entries), target, {
    sudo: spec.sudo,
    signal: opts.signal,
    okCodes: [0, 1],
    hashContent: true,
    guard,
    acceptFailure: (code, stderr) => {
      const said = readTarMessages(stderr);
      return code === 2 && said.fileProblems.length > 0 && said.other.length === 0;
    },
  });
  const said = readTarMessages(r.stderr);
  const essential = said.leftOut.find((name) => isEssential(spec.kind, name));
  if (essential !== undefined) {
    fs.rmSync(target, { force: true });
    throw new ArchiveError(
      `${printable(path.join(spec.base, essential))} exists on ${host.label} and cannot be read: ${unreadableHint(spec)}; not written`,
    );
  }
  const result = {
    bytes: r.bytes,
    sha256: r.sha256,
    fingerprint: r.fingerprint,
    contentSha256: r.contentSha256!,
    entries,
    warnings: [...said.fileProblems, ...said.other, ...guard.result.dropped].map(printable),
  };
  if (opts.unlessSameAs) {
    // A copy that cannot be read back (damaged, or not a regular file) is not the same: a fresh
    // one is written.
    const same =
      isRegularFile(opts.unlessSameAs) &&
      (await contentSha256(opts.unlessSameAs).catch(() => undefined)) === result.contentSha256;
    if (same) {
      fs.rmSync(target, { force: true });
      return { ...result, written: false };
    }
    fs.renameSync(target, file);
  }
  return { ...result, written: true };
}

/** sha256 of a .tar.gz's uncompressed bytes. */
async function contentSha256(gzFile: string): Promise<string> {
  const hash = crypto.createHash('sha256');
  await pipeline(await readStream(gzFile), zlib.createGunzip(), hash);
  return hash.digest('hex');
}

/** A regular file as a stream, opened without blocking (a FIFO under an artifact's name is refused). */
async function readStream(file: string) {
  const { handle } = await openRegular(file);
  return handle.createReadStream({ highWaterMark: 1 << 20 });
}

/** A gzipped tar of local files, flat, by their base names (the R2 bundle of a run's artifacts). */
async function bundleFiles(files: string[], dest: string, signal?: AbortSignal): Promise<Written> {
  const pack = tar.pack();
  const feeding = (async () => {
    for (const file of files) {
      const st = fs.statSync(file);
      const entry = pack.entry({
        name: path.basename(file),
        size: st.size,
        mode: st.mode & 0o7777,
        mtime: st.mtime,
        uid: st.uid,
        gid: st.gid,
      });
      await pipeline(await readStream(file), entry);
    }
    pack.finalize();
  })();
  feeding.catch((e) => pack.destroy(e));
  const written = await writeStreamAtomic(dest, pack.pipe(zlib.createGzip()), 0o600, signal);
  await feeding;
  return written;
}

/**
 * The step that writes one config archive into `dir` as `KIND-T.tar.gz`. A source missing on
 * the host is a warning and a skipped row. With `dedupe`, an archive whose content equals the
 * newest copy in `dir` is not written again (backup-cron's hourly copies).
 */
export function archiveStep(o: {
  host: Host;
  spec: ArchiveSpec;
  dir: string;
  record: RunRecord;
  dedupe?: boolean;
  /** backup-cron's copies go to SFS: SFS_MOUNT must be mounted (lib/sfs.ts). */
  sfsMount?: string;
}): Step {
  const { spec, host } = o;
  const name = `${spec.kind}-${o.record.stamp}.tar.gz`;
  const file = path.join(o.dir, name);
  const none = (where: string) => `${spec.base}: none of ${spec.entries.join(', ')} exists${where}`;
  return {
    name: spec.title,
    moves: `${host.label}:${path.join(spec.base, spec.entries.join(' '))} → ${file}`,
    async run(ctx) {
      await requireSfs(host, o.sfsMount, o.dir, 'writing a copy into', ctx.signal);
      if (ctx.dryRun) {
        const present = await presentEntries(host, spec, ctx.signal);
        if (!present.length) return { status: 'skipped', summary: 'nothing to archive', warnings: [none('')] };
        return { summary: `would write ${name} from ${present.length} ${present.length === 1 ? 'entry' : 'entries'}` };
      }
      ensurePrivateDir(o.dir);
      const newest = o.dedupe ? newestLocal(o.dir, spec.kind, 'tar.gz') : undefined;
      const r = await writeArchive(host, spec, file, { signal: ctx.signal, unlessSameAs: newest }).catch((e) => {
        if (e instanceof LayoutError)
          throw new LayoutError(`${host.label} sent ${e.message}: refused, ${name} not written`);
        throw e;
      });
      if (!r) return { status: 'skipped', summary: 'nothing to archive', warnings: [none(` on ${host.label}`)] };
      const warnings = r.warnings.map((w) => `${name}: ${w}`);
      if (!r.written) return { summary: `unchanged since ${path.basename(newest!)}: not written again`, warnings };
      o.record.artifact({ name, bytes: r.bytes, sha256: r.sha256 });
      const data = { file, bytes: r.bytes, sha256: r.sha256, entries: r.entries };
      return { summary: `${name} (${humanSize(r.bytes)})`, bytes: r.bytes, warnings, data };
    },
  };
}

/**
 * `tailscale-ip.txt`: Verda's Tailscale IPv4, or `unknown` when tailscale is missing, fails, hangs,
 * prints without end or prints anything but an address (what Verda says is data: only an address
 * is written, and nothing else of it is printed).
 */
export function tailscaleIpStep(o: { host: Host; dir: string; record: RunRecord }): Step {
  const file = path.join(o.dir, 'tailscale-ip.txt');
  return {
    name: 'Tailscale IP',
    moves: `${o.host.label}: tailscale ip -4 → ${file}`,
    async run(ctx) {
      // No Verda at all is a failure (the command throws); a hung or endless tailscale is "unknown".
      let said = '';
      const r = await o.host.$({
        signal: ctx.signal,
        nothrow: true,
      })`sh -c ${program('tailscale-ip')} tailscale-ip`.catch((e) => {
        if (!(e instanceof CommandTimeout || e instanceof OutputTooLarge)) throw e;
        said = ` (${e.message})`;
        return { code: 1, stdout: '', stderr: '' };
      });
      const first = r.code === 0 ? r.stdout.split('\n')[0].trim() : '';
      const ip = net.isIPv4(first) ? first : 'unknown';
      if (r.code === 0 && ip === 'unknown')
        said = ` (it printed something that is not an IPv4 address: ${printable(first.slice(0, 60))})`;
      if (ctx.dryRun) return { summary: `would write tailscale-ip.txt (${ip})` };
      ensurePrivateDir(o.dir);
      writeFileAtomic(file, `${ip}\n`, 0o600);
      o.record.artifact({
        name: 'tailscale-ip.txt',
        bytes: ip.length + 1,
        sha256: crypto.createHash('sha256').update(`${ip}\n`).digest('hex'),
      });
      const warnings = ip === 'unknown' ? [`tailscale ip -4 failed on Verda${said}: wrote "unknown"`] : [];
      return { summary: `tailscale-ip.txt: ${ip}`, warnings };
    },
  };
}

export const BUNDLE_KEY = 'verda-config-backup.tar.gz';
/** The worker image's artifact: Mello keeps it, the config bundle leaves it out. */
export const IMAGE_FILE = 'worker-image.tar.gz';
export const BUNDLE_PREFIX = 'verda-config-backups/';

/**
 * The R2 config bundle: this run's config artifacts in one tarball, sent as the latest
 * `verda-config-backup.tar.gz` and as a dated copy. Not sent when a config step failed: an
 * incomplete bundle must not replace the last good one.
 *
 * With `ageRecipients` (AGE_RECIPIENTS) the bundle holds secrets (Tailscale identity, SSH host
 * keys, the project .env, home) and leaves Mello encrypted: the plaintext tarball is written to a
 * temporary file on Mello (0600, removed after), streamed through age into a second temporary
 * file, and that ciphertext is what is sent, as `verda-config-backup.tar.gz.age` and
 * `verda-config-backups/verda-config-backup-T.tar.gz.age`. Sending from a file keeps memory to a
 * chunk and lets a failed part be sent again. The manifest records the ciphertext's bytes and
 * sha256 (what R2 holds, and its `sha256` metadata) and the plaintext's sha256.
 */
export function bundleStep(o: {
  dir: string;
  cacheBucket: Backend;
  bucket: string;
  record: RunRecord;
  configSteps: Step[];
  ageRecipients?: string[];
}): Step {
  const encrypt = o.ageRecipients?.length ? o.ageRecipients : undefined;
  const suffix = encrypt ? AGE_SUFFIX : '';
  const latest = BUNDLE_KEY + suffix;
  const dated = `${BUNDLE_PREFIX}verda-config-backup-${o.record.stamp}.tar.gz${suffix}`;
  const how = encrypt ? `, age-encrypted to ${encrypt.length} recipient${encrypt.length === 1 ? '' : 's'}` : '';
  return {
    name: 'Config bundle to R2',
    moves: `this run's config artifacts → ${o.cacheBucket.name}/${latest} and ${dated}${how}`,
    async run(ctx) {
      if (ctx.dryRun) return { summary: `would send the run's config artifacts as ${latest} and ${dated}${how}` };
      const failed = failedBefore(ctx, o.configSteps);
      if (failed.length)
        throw new Error(`not sent, ${failed.map((r) => r.name).join(', ')} failed: R2 keeps the previous bundle`);
      const config = o.record.artifacts.filter((a) => a.name !== IMAGE_FILE);
      if (!config.length) throw new Error('no config artifact was written: nothing to bundle');
      const tmp = path.join(o.dir, `.verda-config-backup-${o.record.stamp}.tar.gz`);
      const tmpAge = tmp + AGE_SUFFIX;
      try {
        const plain = await bundleFiles(
          config.map((a) => path.join(o.dir, a.name)),
          tmp,
          ctx.signal,
        );
        const b = encrypt ? await encryptFile(encrypt, tmp, tmpAge, ctx.signal) : plain;
        const file = encrypt ? tmpAge : tmp;
        const bucket = o.bucket;
        for (const key of [latest, dated]) {
          await o.cacheBucket.put(key, fingerprintedSource(file, b.fingerprint), {
            metadata: { sha256: b.sha256 },
            signal: ctx.signal,
          });
          o.record.object({
            bucket,
            key,
            bytes: b.bytes,
            sha256: b.sha256,
            action: 'uploaded',
            ...(encrypt ? { encrypted: 'age' as const, plaintextSha256: plain.sha256 } : {}),
          });
        }
        return {
          summary: `${config.length} artifacts (${humanSize(b.bytes)}${how}) sent as ${latest} and ${dated}`,
          bytes: b.bytes * 2,
        };
      } finally {
        fs.rmSync(tmp, { force: true });
        fs.rmSync(tmpAge, { force: true });
      }
    },
  };
}

/** A local file encrypted with age into `dest` (0600, through a temporary name), streamed. */
async function encryptFile(recipients: string[], src: string, dest: string, signal: AbortSignal): Promise<Written> {
  const cipher = await encryptStream(recipients, await readStream(src));
  return writeStreamAtomic(dest, cipher, 0o600, signal);
}

/**
 * Rotation of the dated bundles in R2: the `keep` newest of `verda-config-backup-T.tar.gz` and
 * `...tar.gz.age` together (one series, whichever way each was sent). With `encrypted` (this
 * run sent `.age` bundles), every plaintext bundle left in R2 goes too, the latest
 * `verda-config-backup.tar.gz` included: once AGE_RECIPIENTS is set, no plaintext copy of the
 * secrets stays in R2 (Mello keeps its own plaintext copies). Returns the deleted keys.
 */
/** A key of the config bundle: the latest (plain or `.age`) or a dated copy. */
export const isBundleKey = (key: string) => key.startsWith(BUNDLE_KEY) || key.startsWith(BUNDLE_PREFIX);

export interface DatedBundle {
  key: string;
  stamp: string;
  encrypted: boolean;
}

/**
 * The dated bundles in the cache bucket, plain and age-encrypted, newest first (for one stamp,
 * the encrypted copy first). What rotation, `--status` and a restore from R2 all read.
 */
export async function listBundles(cacheBucket: Backend, signal?: AbortSignal): Promise<DatedBundle[]> {
  const plain = datedPattern('verda-config-backup', 'tar.gz');
  const sealed = datedPattern('verda-config-backup', `tar.gz${AGE_SUFFIX}`);
  const found: DatedBundle[] = [];
  for await (const obj of cacheBucket.list(BUNDLE_PREFIX, signal)) {
    const name = obj.key.slice(BUNDLE_PREFIX.length);
    const m = plain.exec(name) ?? sealed.exec(name);
    if (m) found.push({ key: obj.key, stamp: m[1]!, encrypted: m[0].endsWith(AGE_SUFFIX) });
  }
  return found.sort((a, b) =>
    a.stamp === b.stamp ? Number(b.encrypted) - Number(a.encrypted) : a.stamp < b.stamp ? 1 : -1,
  );
}

/** The latest key that goes with a dated bundle: `verda-config-backup.tar.gz`, `.age` when encrypted. */
export const latestBundleKey = (newest?: DatedBundle) => BUNDLE_KEY + (newest?.encrypted ? AGE_SUFFIX : '');

export async function rotateBundles(
  cacheBucket: Backend,
  keep: number,
  opts: {
    /** The stamps of the restore points BACKUP_DIR keeps: their bundles are never deleted. */
    keptStamps: Set<string>;
    /**
     * Whether BACKUP_DIR holds `keep` usable restore points of its own: until then (a fresh Mello,
     * an empty BACKUP_DIR) R2's dated bundles are the only history there is, and none is deleted.
     */
    trim: boolean;
    /**
     * AGE_RECIPIENTS, when this run's bundle was encrypted: every plaintext bundle goes (secrets
     * out of R2 is what encryption is for); a kept point's is sent again encrypted first (through
     * a temporary file in `tmpDir`), so that point stays whole.
     */
    encryptTo?: string[];
    tmpDir?: string;
  },
  signal?: AbortSignal,
): Promise<{ deleted: string[]; notes: string[] }> {
  const found = await listBundles(cacheBucket, signal);
  const notes: string[] = [];
  const encrypted = Boolean(opts.encryptTo?.length);
  if (encrypted) {
    for (const f of found.filter((b) => !b.encrypted && opts.keptStamps.has(b.stamp))) {
      if (found.some((b) => b.encrypted && b.stamp === f.stamp)) continue;
      await reencryptBundle(cacheBucket, f.key, opts.encryptTo!, opts.tmpDir!, signal);
      notes.push(`${f.key} of a kept restore point sent again age-encrypted`);
    }
  }
  const doomed = found
    .filter((f, i) => (encrypted && !f.encrypted) || (opts.trim && i >= keep && !opts.keptStamps.has(f.stamp)))
    .map((f) => f.key);
  if (!opts.trim && found.length > keep)
    notes.push(
      `R2's ${found.length} dated bundles kept: BACKUP_DIR holds fewer than ${keep} restore points of its own`,
    );
  // The plain latest key once bundles are encrypted: superseded by the .age one, and it holds secrets.
  if (encrypted && (await cacheBucket.head(BUNDLE_KEY, signal))) doomed.push(BUNDLE_KEY);
  for (const key of doomed) await cacheBucket.delete(key, signal);
  return { deleted: doomed, notes };
}

/**
 * A plaintext dated bundle as `KEY.age`, encrypted on Mello (streamed through a 0600 temporary
 * file), with the plaintext's sha256 in its metadata: what a restore point that recorded the
 * plaintext bundle is judged by once the plaintext is gone.
 */
async function reencryptBundle(
  cacheBucket: Backend,
  key: string,
  recipients: string[],
  tmpDir: string,
  signal?: AbortSignal,
) {
  const head = await cacheBucket.head(key, signal);
  const plainSha = head?.metadata.sha256;
  if (!head || !plainSha) return;
  ensurePrivateDir(tmpDir);
  const tmp = path.join(tmpDir, `.reencrypt-${process.pid}-${path.basename(key)}${AGE_SUFFIX}`);
  try {
    const digest = crypto.createHash('sha256');
    const plain = (await cacheBucket.get(key, signal)).pipe(tap((chunk) => void digest.update(chunk)));
    const cipher = await writeStreamAtomic(tmp, await encryptStream(recipients, plain), 0o600, signal);
    if (digest.digest('hex') !== plainSha)
      throw new Error(`${cacheBucket.name}/${key}: its bytes are not its recorded sha256`);
    await cacheBucket.put(key + AGE_SUFFIX, fingerprintedSource(tmp, cipher.fingerprint), {
      metadata: { sha256: cipher.sha256, 'plaintext-sha256': plainSha },
      signal,
    });
  } finally {
    fs.rmSync(tmp, { force: true });
  }
}

/** --verify for backup-cron: the newest SFS copy of a kind is a whole archive, mode 0600. */
export function verifyCopyStep(o: { host: Host; spec: ArchiveSpec; dir: string }): Step {
  const { spec, dir } = o;
  return {
    name: `${spec.title}: newest copy`,
    moves: `${dir}/${spec.kind}-*.tar.gz`,
    async run(ctx) {
      const newest = newestLocal(dir, spec.kind, 'tar.gz');
      const warnings = copyWarnings(dir, spec.kind, 'tar.gz');
      if (!newest) {
        const present = await presentEntries(o.host, spec, ctx.signal);
        if (present.length) throw new Error(`no copy of ${spec.kind} in ${dir}, though its source exists`);
        warnings.push(`${spec.base}: none of ${spec.entries.join(', ')} exists; no copy expected`);
        return { status: 'skipped', summary: 'no copy', warnings };
      }
      const name = path.basename(newest);
      let entries: number;
      try {
        entries = (await checkArchiveFile(newest, spec.kind, ctx.signal)).entries;
      } catch (e) {
        if (e instanceof LayoutError) throw new LayoutError(`${name} holds ${e.message}`);
        throw new Error(`${name} is not a whole archive (${errorText(e)})`);
      }
      const mode = fs.statSync(newest).mode & 0o777;
      if (mode !== 0o600) warnings.push(`${name} has mode ${mode.toString(8)}, not 600`);
      return { summary: `${name}: whole, ${entries} entries`, warnings, data: { file: newest, entries } };
    },
  };
}
