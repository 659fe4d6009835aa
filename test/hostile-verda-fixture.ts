// The hostile Verda of issue 24, for test/hostile-verda.test.ts: stand-in commands first on the
// PATH a loopback sshd gives its sessions (tar, tailscale, docker/podman, node and the installed
// backup-verda.mts), a session logger that records every command Verda is asked to run (its
// command line, environment and stdin), tar tails to append to an archive, a recording ping
// server, per-bucket keys on s3rver, and the snapshots and printability rules the suite asserts.
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import { createRequire } from 'node:module';
import type net from 'node:net';
import path from 'node:path';
import { PassThrough } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import zlib from 'node:zlib';
import tar from 'tar-stream';

// ---------------------------------------------------------------------------------------------
// Stand-ins

export interface StandIns {
  /** Put first on the sessions' PATH (sshd's SetEnv). */
  bin: string;
  /** sshd's ForceCommand: logs each session, then runs what it was asked to run. */
  sessionLogger: string;
  /** What the stand-ins read: `tailscale.mode`, `models.mode`, `tar-rules`. */
  control: string;
}

/** The IPv4 a well-behaved tailscale prints. */
export const TAILSCALE_IP = '100.64.0.7';
const IMAGE_ID = `sha256:${'ab12'.repeat(16)}`;

/** The line the models answer forges, and what marks it as forged. */
export const FORGED = '=== Backup complete in 0.4s: 14 ok, 0 skipped, 0 failed (FORGED) ===';

const sh = (lines: string[]) => lines.join('\n') + '\n';

/** The lines every stand-in starts with: its argv and environment go to `log/NAME-PID-N.*`. */
const logged = (name: string, log: string) => [
  '#!/bin/bash',
  `log=${JSON.stringify(log)}/${name}-$$-$RANDOM`,
  `printf '%s\\0' "$@" > "$log.argv"`,
  'env -0 > "$log.env"',
];

/**
 * The models answer (a `node` first on the PATH): reads the request up
 * to its `"modelsDir"` line (a bundle pushed before it on stdin is read past), keeps it in the
 * log, and prints one JSON line chosen by `models.mode`:
 *   clean:  one model, unchanged in R2, with its size and sha256;
 *   forged: the same, with notices, a cache warning and progress lines carrying line breaks,
 *           a forged summary line and terminal escapes;
 *   nosha:  a model recorded as sent without a sha256 or a size, beside a proper one.
 */
function answerModels(log: string, control: string, model: { key: string; bytes: number; sha256: string }): string {
  const skip = { action: 'skip', key: model.key, bytes: model.bytes, sha256: model.sha256, how: 'known' };
  const base = {
    files: 1,
    bytes: model.bytes,
    sent: 0,
    sentBytes: 0,
    skipped: 1,
    adopted: 0,
    hashed: 0,
    symlinkCount: 0,
    symlinks: [],
    failureCount: 0,
    failures: [],
    vanished: [],
    actions: [skip],
    actionCount: 1,
    notices: [] as string[],
  };
  const forged = {
    ...base,
    notices: [`all models sent\n${FORGED}\n\x1b[2K\x1b[1Aall good`, `\x1b]0;pwned\x07\x9b31mred\r${FORGED}`],
    cacheWarning: `hash cache kept\n${FORGED}\x1b[0m`,
  };
  const nosha = {
    ...base,
    files: 2,
    sent: 1,
    actions: [skip, { action: 'send', key: 'checkpoints/unhashed.safetensors', reason: 'new' }],
    actionCount: 2,
  };
  const answers: Record<string, unknown> = { clean: base, forged, nosha };
  return sh([
    ...logged('answer-models', log),
    `mode=$(cat ${JSON.stringify(path.join(control, 'models.mode'))} 2>/dev/null || echo clean)`,
    'case " $* " in *" --version "*|*" -v "*) echo v20.20.2; exit 0;; esac',
    // One line: the request (the first line holding "modelsDir"), nothing after it is awaited.
    `grep -a -m1 '"modelsDir"' > "$log.request"`,
    `if [ "$mode" = forged ]; then printf 'send \\033[2J\\033]0;x\\007checkpoints/clean.safetensors\\n%s\\n' ${shellWord(FORGED)} >&2; fi`,
    'case "$mode" in',
    ...Object.entries(answers).map(([mode, a]) => `  ${mode}) printf '%s\\n' ${shellWord(JSON.stringify(a))} ;;`),
    'esac',
    'exit 0',
  ]);
}

/** One word for bash: single-quoted. */
function shellWord(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

/**
 * GNU tar, with tails: for `--create`, each line `CONDITIONS<TAB>TAIL` of `tar-rules` whose
 * conditions all hold for the arguments appends the archive TAIL (made by tarTail) to what the
 * real tar wrote, compressed again when it was gzipped. Conditions, joined by ` & `:
 * `dir=PATH` (--directory=PATH, -C PATH), `arg=WORD` (an argument is WORD), `arg~TEXT` (an
 * argument holds TEXT), and `!` before either of the last two to negate it.
 */
function tarStandIn(log: string, control: string): string {
  return sh([
    ...logged('tar', log),
    'real=/usr/bin/tar',
    'create=0',
    'for a in "$@"; do case $a in --create) create=1;; --*) ;; -*c*) create=1;; esac; done',
    '[ $create = 1 ] || exec $real "$@"',
    'holds() { # holds COND ARGS...',
    '  local cond=$1 neg=0 prev= a; shift',
    '  case $cond in !*) neg=1; cond=${cond#!};; esac',
    '  local found=1',
    '  for a in "$@"; do',
    '    case $cond in',
    '      dir=*) if [ "$a" = "--directory=${cond#dir=}" ] || { { [ "$prev" = -C ] || [ "$prev" = --directory ]; } && [ "$a" = "${cond#dir=}" ]; }; then found=0; fi ;;',
    '      arg=*) [ "$a" = "${cond#arg=}" ] && found=0 ;;',
    '      arg~*) case $a in *"${cond#arg~}"*) found=0;; esac ;;',
    '    esac',
    '    prev=$a',
    '  done',
    '  if [ $neg = 1 ]; then [ $found = 1 ]; else [ $found = 0 ]; fi',
    '}',
    'tails=()',
    `rules=${JSON.stringify(path.join(control, 'tar-rules'))}`,
    'if [ -s "$rules" ]; then',
    `  while IFS=$'\\t' read -r conds tail; do`,
    '    [ -n "$conds" ] || continue',
    '    ok=1',
    `    IFS='&' read -ra parts <<< "$conds"`,
    '    for c in "${parts[@]}"; do c=${c# }; c=${c% }; holds "$c" "$@" || ok=0; done',
    '    [ $ok = 1 ] && tails+=("$tail")',
    '  done < "$rules"',
    'fi',
    '[ ${#tails[@]} -gt 0 ] || exec $real "$@"',
    'printf \'%s\\n\' "${tails[@]}" > "$log.tails"',
    `tmp=$(mktemp -d -p ${JSON.stringify(control)})`,
    // Whatever the real tar writes to stdout (--file=-, -f -, the default) is the archive.
    '$real "$@" > "$tmp/out"',
    'rc=$?',
    'if [ "$(head -c2 "$tmp/out" | od -An -tx1 | tr -d \' \\n\')" = 1f8b ]; then gz=1; gzip -dc < "$tmp/out" > "$tmp/a.tar"; else gz=0; mv "$tmp/out" "$tmp/a.tar"; fi',
    'for t in "${tails[@]}"; do $real --concatenate --file="$tmp/a.tar" "$t" || exit 2; done',
    'if [ $gz = 1 ]; then gzip -c < "$tmp/a.tar"; else cat "$tmp/a.tar"; fi',
    'rm -rf "$tmp"',
    'exit $rc',
  ]);
}

/**
 * tailscale by `tailscale.mode`: `normal` prints the address; `escapes` prints it wrapped in
 * terminal escapes, a carriage return and a forged line (and escapes on stderr); `forever`
 * prints without end.
 */
function tailscaleStandIn(log: string, control: string): string {
  const noise = 'A'.repeat(200);
  return sh([
    ...logged('tailscale', log),
    `mode=$(cat ${JSON.stringify(path.join(control, 'tailscale.mode'))} 2>/dev/null || echo normal)`,
    '[ "$1" = ip ] || { echo "tailscale stand-in: $*" >&2; exit 1; }',
    'case "$mode" in',
    `  normal) echo ${TAILSCALE_IP} ;;`,
    `  escapes) printf '\\033]0;pwned\\007\\033[2J${TAILSCALE_IP}\\033[31m\\r%s\\n\\033[0m=== tailscale says hello ===\\n' ${shellWord(FORGED)}; printf '\\033[2Jwarning: \\033[31m%s\\n' ${shellWord(FORGED)} >&2 ;;`,
    `  forever) exec yes ${noise} ;;`,
    'esac',
  ]);
}

/**
 * docker or podman: the image's ID (by `image.mode`: `normal`, or `escapes`, an ID wrapped in
 * terminal escapes), and `save` as a small tar stream.
 */
function containerStandIn(name: string, log: string, control: string): string {
  return sh([
    ...logged(name, log),
    `mode=$(cat ${JSON.stringify(path.join(control, 'image.mode'))} 2>/dev/null || echo normal)`,
    'case "$1 $2" in',
    `  "image inspect") if [ "$mode" = escapes ]; then printf 'sha256:\\033[2J\\033]0;pwned\\007${IMAGE_ID.slice(7, 40)}\\n'; else echo ${IMAGE_ID}; fi ;;`,
    `  "save "*) exec /usr/bin/tar --create --file=- --directory=${JSON.stringify(path.join(control, 'image'))} . ;;`,
    `  *) echo "${name} stand-in: $*" >&2; exit 1 ;;`,
    'esac',
  ]);
}

/**
 * sshd's ForceCommand: what the session was asked to run (SSH_ORIGINAL_COMMAND), its environment
 * and everything that arrives on its stdin go to `log/session-*`; then the command runs with the
 * user's shell, as sshd would run it, its stdin passed through. stdin is copied by a tee into a
 * FIFO, and the tee is stopped when the command ends: a command whose stdin Mello holds open
 * (the models request) still ends its session.
 */
function sessionLogger(log: string): string {
  return sh([
    '#!/bin/bash',
    `log=${JSON.stringify(log)}/session-$(date +%s%N)-$$`,
    `printf '%s' "$SSH_ORIGINAL_COMMAND" > "$log.cmd"`,
    'env -0 > "$log.env"',
    'mkfifo "$log.fifo"',
    // An asynchronous command's stdin is /dev/null unless redirected: the session's is passed on fd 3.
    'exec 3<&0',
    'tee "$log.stdin" <&3 > "$log.fifo" 2>/dev/null &',
    'copier=$!',
    'exec 3<&-',
    '"${SHELL:-/bin/sh}" -c "$SSH_ORIGINAL_COMMAND" < "$log.fifo"',
    'rc=$?',
    'kill $copier 2>/dev/null',
    'rm -f "$log.fifo"',
    'exit $rc',
  ]);
}

/** Writes a session logger (sshd's ForceCommand) logging into `log`; returns its path. */
export function writeSessionLogger(file: string, log: string): string {
  fs.mkdirSync(log, { recursive: true });
  fs.mkdirSync(path.dirname(file), { recursive: true });
  fs.writeFileSync(file, sessionLogger(log), { mode: 0o755 });
  return file;
}

/** Writes the stand-ins under `root` (bin/, verda-scripts/, session-logger); they log into `log`. */
export function writeStandIns(
  root: string,
  log: string,
  control: string,
  model: { key: string; bytes: number; sha256: string },
): StandIns {
  const bin = path.join(root, 'bin');
  for (const d of [bin, log, control]) fs.mkdirSync(d, { recursive: true });
  const put = (file: string, text: string) => fs.writeFileSync(file, text, { mode: 0o755 });
  put(path.join(bin, 'tar'), tarStandIn(log, control));
  put(path.join(bin, 'tailscale'), tailscaleStandIn(log, control));
  put(path.join(bin, 'docker'), containerStandIn('docker', log, control));
  put(path.join(bin, 'podman'), containerStandIn('podman', log, control));
  // The models step runs `node` on Verda with the bundle it pushed: the stand-in answers instead.
  put(path.join(bin, 'node'), answerModels(log, control, model));
  const sessionLog = writeSessionLogger(path.join(root, 'session-logger'), log);
  fs.mkdirSync(path.join(control, 'image/etc'), { recursive: true });
  fs.writeFileSync(path.join(control, 'image/etc/motd'), 'the stand-in worker image\n');
  return { bin, sessionLogger: sessionLog, control };
}

// ---------------------------------------------------------------------------------------------
// Archives

export interface TailEntry {
  name: string;
  type?: 'file' | 'link' | 'symlink' | 'directory' | 'fifo' | 'character-device';
  content?: string | Buffer;
  linkname?: string;
  mode?: number;
}

/** A tar archive of exactly these entries (names as given: `..`, `/` and control characters kept). */
export async function tarOf(entries: TailEntry[]): Promise<Buffer> {
  const pack = tar.pack();
  const chunks: Buffer[] = [];
  pack.on('data', (c) => chunks.push(c as Buffer));
  const done = new Promise<void>((resolve, reject) => {
    pack.on('end', resolve);
    pack.on('error', reject);
  });
  for (const e of entries) {
    const type = e.type ?? 'file';
    const header = {
      name: e.name,
      type,
      mode: e.mode ?? (type === 'directory' ? 0o755 : 0o644),
      mtime: new Date('2026-01-01T00:00:00Z'),
      uid: 0,
      gid: 0,
      uname: 'root',
      gname: 'root',
      linkname: e.linkname,
    };
    if (type === 'file') pack.entry(header, Buffer.from(e.content ?? ''));
    else pack.entry(header);
  }
  pack.finalize();
  await done;
  return Buffer.concat(chunks);
}

/** A .tar.gz whose one member `name` unpacks to `size` zero bytes: a few KiB on disk. */
export async function gzipBomb(file: string, name: string, size: number): Promise<void> {
  const pack = tar.pack();
  const zeros = new PassThrough();
  const entry = pack.entry({ name, size, mode: 0o644, mtime: new Date('2026-01-01T00:00:00Z') }, (e) => {
    if (e) pack.destroy(e);
    else pack.finalize();
  });
  zeros.pipe(entry);
  const writing = pipeline(pack, zlib.createGzip({ level: 9 }), fs.createWriteStream(file, { mode: 0o600 }));
  const block = Buffer.alloc(1 << 20);
  for (let left = size; left > 0; left -= block.length) {
    if (!zeros.write(left >= block.length ? block : block.subarray(0, left)))
      await new Promise((r) => zeros.once('drain', r));
  }
  zeros.end();
  await writing;
}

/** The names of a .tar.gz's members, as stored (nothing stripped), with their type and link target. */
export async function membersOf(gzFile: string): Promise<{ name: string; type: string; linkname?: string }[]> {
  const found: { name: string; type: string; linkname?: string }[] = [];
  const extract = tar.extract();
  extract.on('entry', (h, stream, next) => {
    found.push({ name: h.name, type: h.type ?? 'file', linkname: h.linkname ?? undefined });
    stream.on('end', next);
    stream.resume();
  });
  await pipeline(fs.createReadStream(gzFile), zlib.createGunzip(), extract);
  return found;
}

export const sha256 = (data: Buffer | string) => crypto.createHash('sha256').update(data).digest('hex');

// ---------------------------------------------------------------------------------------------
// R2 keys: one pair per bucket, each valid for its bucket only

export interface KeyPair {
  id: string;
  secret: string;
  bucket: string;
  /** R2_MODELS, R2_CACHE, R2_USER_FILES. */
  vars: string;
}

/** Registers the pairs with s3rver (which then checks their signatures) and refuses each outside its bucket. */
export function scopeKeysToBuckets(pairs: KeyPair[]) {
  const require = createRequire(import.meta.url);
  const dir = path.dirname(require.resolve('s3rver/package.json'));
  const AWSAccount = require(path.join(dir, 'lib/models/account.js'));
  const router = require(path.join(dir, 'lib/routes.js'));
  const S3Error = require(path.join(dir, 'lib/models/error.js'));
  const scope = new Map<string, string>();
  for (const k of pairs) {
    AWSAccount.DUMMY_ACCOUNT.createKeyPair(k.id, k.secret);
    scope.set(k.id, k.bucket);
  }
  const layer = (router.stack as { stack: Function[] }[]).find((l) =>
    l.stack.some((f) => f.name === 'authentication'),
  )!;
  const i = layer.stack.findIndex((f) => f.name === 'authentication');
  const original = layer.stack[i];
  layer.stack[i] = function authentication(
    ctx: { headers: Record<string, unknown>; params: { bucket?: string } },
    next: unknown,
  ) {
    const keyId = /Credential=([^/]+)\//.exec(String(ctx.headers.authorization ?? ''))?.[1];
    const bucket = keyId ? scope.get(keyId) : undefined;
    if (bucket && ctx.params.bucket !== bucket) throw new S3Error('AccessDenied', 'Access Denied', {});
    return original(ctx, next);
  };
}

// ---------------------------------------------------------------------------------------------
// Pings

export interface Ping {
  method: string;
  path: string;
  body: string;
}

export interface PingServer {
  url: string;
  pings: Ping[];
  close(): void;
}

/** A loopback HTTP server that records each request and answers OK. */
export async function pingServer(): Promise<PingServer> {
  const pings: Ping[] = [];
  const sockets = new Set<net.Socket>();
  const server = http.createServer((req, res) => {
    let body = '';
    req.setEncoding('utf8');
    req.on('data', (d: string) => (body += d));
    req.on('end', () => {
      pings.push({ method: req.method ?? '', path: req.url ?? '', body });
      res.end('OK');
    });
  });
  server.on('connection', (s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as net.AddressInfo;
  return {
    url: `http://127.0.0.1:${port}`,
    pings,
    close() {
      for (const s of sockets) s.destroy();
      server.close();
    },
  };
}

// ---------------------------------------------------------------------------------------------
// What the suite asserts

/**
 * Every entry under `root` (lstat, links not followed): type, mode, owner, size, content digest,
 * mtime, ctime and inode; a file rewritten with the same bytes still shows (its ctime or inode).
 * `skip`: relative paths left out, with what is under them.
 */
export function snapshot(root: string, skip: (rel: string) => boolean = () => false): Record<string, string> {
  const result: Record<string, string> = {};
  const visit = (dir: string, rel: string) => {
    let names: string[];
    try {
      names = fs.readdirSync(dir).sort();
    } catch {
      return;
    }
    for (const name of names) {
      const r = rel ? `${rel}/${name}` : name;
      if (skip(r)) continue;
      const full = path.join(dir, name);
      let st: fs.BigIntStats;
      try {
        st = fs.lstatSync(full, { bigint: true });
      } catch {
        continue;
      }
      const meta = `${(st.mode & 0o7777n).toString(8)} ${st.uid}:${st.gid} ino ${st.ino} ctime ${st.ctimeNs} mtime ${st.mtimeNs}`;
      if (st.isDirectory()) {
        result[r] = `dir ${meta}`;
        visit(full, r);
      } else if (st.isFile()) result[r] = `file ${meta} ${st.size} ${sha256(fs.readFileSync(full))}`;
      else if (st.isSymbolicLink()) result[r] = `link ${meta} -> ${fs.readlinkSync(full)}`;
      else result[r] = `other ${meta}`;
    }
  };
  visit(root, '');
  return result;
}

/** Bytes of the regular files under `dirs` now (links not followed): what a run has on disk. */
export function bytesUnder(dirs: string[]): number {
  let total = 0;
  const visit = (dir: string) => {
    let entries: fs.Dirent[];
    try {
      entries = fs.readdirSync(dir, { withFileTypes: true });
    } catch {
      return;
    }
    for (const e of entries) {
      const full = path.join(dir, e.name);
      if (e.isDirectory()) visit(full);
      else if (e.isFile()) {
        try {
          total += fs.lstatSync(full).size;
        } catch {
          /* gone meanwhile */
        }
      }
    }
  };
  for (const d of dirs) visit(d);
  return total;
}

/**
 * What makes text unprintable, line by line: a C0 control character other than the newline
 * (ESC, CR, TAB, BEL...), DEL, or a C1 control (U+0080–U+009F, CSI among them). Returns each
 * offending line, escaped, with where it came from; none when the text is printable.
 */
export function unprintableLines(text: string, where: string): string[] {
  const bad: string[] = [];
  for (const line of text.split('\n')) {
    if (/[\x00-\x09\x0b-\x1f\x7f\x80-\x9f]/.test(line)) bad.push(`${where}: ${JSON.stringify(line)}`);
  }
  return bad;
}

/** Lines that start with `===`: only a run's own header and result may. */
export const summaryLines = (text: string) => text.split('\n').filter((l) => l.startsWith('==='));

/** Every file under `dirs` that holds one of `secrets` (by name): where a secret reached. */
export function secretsFound(dirs: string[], secrets: Record<string, string>): string[] {
  const found: string[] = [];
  const visit = (dir: string) => {
    let entries: fs.Dirent[];
    try {
      entries = fs.readdirSync(dir, { withFileTypes: true });
    } catch {
      return;
    }
    for (const e of entries) {
      const full = path.join(dir, e.name);
      if (e.isDirectory()) visit(full);
      else if (e.isFile()) {
        let data: Buffer;
        try {
          data = fs.readFileSync(full);
        } catch {
          continue;
        }
        for (const [name, value] of Object.entries(secrets)) if (data.includes(value)) found.push(`${name} in ${full}`);
      }
    }
  };
  for (const d of dirs) visit(d);
  return found;
}
