// Configuration: the SPEC's variables with their defaults. The environment wins over `.env`
// beside the scripts (or --env-file). Every problem is a UsageError naming the variable, raised
// before any work starts.
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { parseAgeRecipients, type AgeRecipients } from './age.ts';
import { UsageError } from './cli.ts';
import { NOTIFY_VARIABLES, checkNotifyUrl } from './notify.ts';

export interface BucketTarget {
  bucket: string;
  endpoint: string;
  accessKeyId: string;
  secretAccessKey: string;
}

export type BucketKind = 'models' | 'cache' | 'userFiles';

/**
 * Timeouts, attempts and backoff: production values by default; tests set them to seconds so a
 * hung request or command is seen in seconds. Every value is in seconds (decimals allowed).
 */
export interface Limits {
  /** COMFYMULTI_R2_TIMEOUT (60): an R2 request with no byte moving either way for this long is abandoned (and retried). */
  r2IdleTimeoutMs: number;
  /** COMFYMULTI_R2_ATTEMPTS (5): attempts per R2 request, the first included. */
  r2Attempts: number;
  /** COMFYMULTI_R2_BACKOFF (0.5): the first retry's delay; doubled per attempt, with jitter. */
  r2BackoffMs: number;
  /** COMFYMULTI_SSH_TIMEOUT (10): ssh's ConnectTimeout, and how long a dead link goes unnoticed (ServerAlive). */
  sshTimeoutS: number;
  /** COMFYMULTI_COMMAND_TIMEOUT (600): a command (local or remote) that neither ends nor prints for this long is killed. */
  commandIdleTimeoutMs: number;
  /** COMFYMULTI_NOTIFY_TIMEOUT (3): one NOTIFY_URL request; a run's end waits for its pings at most twice this. */
  notifyTimeoutMs: number;
}

export const DEFAULT_LIMITS: Limits = {
  r2IdleTimeoutMs: 60_000,
  r2Attempts: 5,
  r2BackoffMs: 500,
  sshTimeoutS: 10,
  commandIdleTimeoutMs: 600_000,
  notifyTimeoutMs: 3_000,
};

/** The limits from COMFYMULTI_R2_TIMEOUT and its siblings; unset or empty keeps the default. */
export function readLimits(env: Record<string, string | undefined>): Limits {
  const value = (name: string) => {
    const raw = env[name]?.trim();
    return raw ? raw : undefined;
  };
  // Seconds, decimals allowed; at most a day, beyond which Node's timers would fire at once.
  const secondsOf = (name: string, fallbackS: number, zero: boolean) => {
    const raw = value(name);
    if (raw === undefined) return fallbackS;
    const s = /^(\d+(\.\d*)?|\.\d+)$/.test(raw) ? Number(raw) : NaN;
    if (!(s <= 86_400) || (!zero && s === 0)) {
      throw new UsageError(`${name} must be a number of seconds, ${zero ? '0' : 'above 0'} to 86400 (got "${raw}")`);
    }
    return s;
  };
  const attemptsRaw = value('COMFYMULTI_R2_ATTEMPTS') ?? String(DEFAULT_LIMITS.r2Attempts);
  const attempts = /^\d+$/.test(attemptsRaw) ? Number(attemptsRaw) : 0;
  if (attempts < 1 || attempts > 100) {
    throw new UsageError(`COMFYMULTI_R2_ATTEMPTS must be a whole number from 1 to 100 (got "${attemptsRaw}")`);
  }
  // A timeout in whole ms, never 0 (which would mean none at all).
  const ms = (name: string, fallbackMs: number, zero = false) => {
    const n = Math.round(secondsOf(name, fallbackMs / 1000, zero) * 1000);
    return zero ? n : Math.max(1, n);
  };
  return {
    r2IdleTimeoutMs: ms('COMFYMULTI_R2_TIMEOUT', DEFAULT_LIMITS.r2IdleTimeoutMs),
    r2Attempts: attempts,
    r2BackoffMs: ms('COMFYMULTI_R2_BACKOFF', DEFAULT_LIMITS.r2BackoffMs, true),
    sshTimeoutS: secondsOf('COMFYMULTI_SSH_TIMEOUT', DEFAULT_LIMITS.sshTimeoutS, false),
    commandIdleTimeoutMs: ms('COMFYMULTI_COMMAND_TIMEOUT', DEFAULT_LIMITS.commandIdleTimeoutMs),
    notifyTimeoutMs: ms('COMFYMULTI_NOTIFY_TIMEOUT', DEFAULT_LIMITS.notifyTimeoutMs),
  };
}

export interface Config {
  env: Record<string, string | undefined>; // merged view, for the few things read lazily
  verdaHost: string;
  melloHost: string;
  sshConfig?: string;
  backupDir: string;
  melloDataDir: string;
  /** As written: its `~` is Mello's home, expanded there by Mello's shell. */
  melloScriptsDir: string;
  verdaSysroot: string;
  verdaSudo: string[];
  /** VERDA_SYSTEMCTL: how restore-verda stops, starts and reloads services on Verda. */
  verdaSystemctl: string[];
  verdaHome: string;
  verdaProjectDir: string;
  verdaModelsDir: string;
  verdaScriptsDir: string;
  sfsBackupDir: string;
  containerCli: 'docker' | 'podman';
  containerImage: string;
  keepBackups: number;
  /** Where hash caches and locks live on this machine. */
  stateDir: string;
  /** STALE_HOURS (26): --status flags a newest backup older than this. */
  staleHours: number;
  limits: Limits;
  /** AGE_RECIPIENTS: the age public keys (or their file; see loadRecipients) the secrets sent to R2 are encrypted to; undefined: not encrypted. */
  ageRecipients?: AgeRecipients;
  /** AGE_IDENTITY_FILE: the age identity that decrypts them (restore, --verify --deep). */
  ageIdentityFile?: string;
  /** DRILL_MAX_BYTES (4 GiB): what a drill may unpack on Mello in all, counted as it unpacks. */
  drillMaxBytes: number;
  /** SFS_MOUNT (/mnt/sfs): must be a mount point on Verda for the steps under it; undefined (empty): no check. */
  sfsMount?: string;
}

const BUCKETS: Record<BucketKind, { name: string; fallback: string; endpoint: string; keys: string }> = {
  models: {
    name: 'R2_MODELS_BUCKET',
    fallback: 'comfy-multi-model-vault-backup',
    endpoint: 'R2_MODELS_ENDPOINT',
    keys: 'R2_MODELS',
  },
  cache: { name: 'R2_CACHE_BUCKET', fallback: 'comfy-multi-cache', endpoint: 'R2_CACHE_ENDPOINT', keys: 'R2_CACHE' },
  userFiles: {
    name: 'R2_USER_FILES_BUCKET',
    fallback: 'comfy-multi-user-files',
    endpoint: 'R2_USER_FILES_ENDPOINT',
    keys: 'R2_USER_FILES',
  },
};

/**
 * A bucket's own key pair (`R2_MODELS_ACCESS_KEY_ID` and `R2_MODELS_SECRET_ACCESS_KEY`), or
 * undefined when neither is set (the bucket then uses R2_ACCESS_KEY_ID / R2_SECRET_ACCESS_KEY).
 * Half a pair is a UsageError naming the missing half: it would silently fall back otherwise.
 */
function bucketKeyPair(env: Record<string, string | undefined>, kind: BucketKind) {
  const idVar = `${BUCKETS[kind].keys}_ACCESS_KEY_ID`;
  const secretVar = `${BUCKETS[kind].keys}_SECRET_ACCESS_KEY`;
  const accessKeyId = env[idVar];
  const secretAccessKey = env[secretVar];
  if (!accessKeyId && !secretAccessKey) return undefined;
  if (!secretAccessKey)
    throw new UsageError(
      `${secretVar} is not set, but ${idVar} is: set both (the ${kind} bucket's key pair) or neither`,
    );
  if (!accessKeyId)
    throw new UsageError(
      `${idVar} is not set, but ${secretVar} is: set both (the ${kind} bucket's key pair) or neither`,
    );
  return { accessKeyId, secretAccessKey };
}

/** Why a dotenv line is refused: `file:line: ...`, naming the key but never its value (it may be a secret). */
function dotenvError(where: string, text: string): UsageError {
  return new UsageError(`${where}: ${text}`);
}

/**
 * The value part of a dotenv line, read as the shell reads a simple assignment where the two
 * agree: single quotes are literal; double quotes take `\"`, `\\`, `\$`, `` \` `` and `\n` (a
 * newline, as dotenv does); unquoted, a `#` after whitespace starts a comment (`a#b` keeps it).
 * `gap` is the whitespace between `=` and the value. Where the shell and dotenv tools read a
 * line differently (`"a"b`, `"a"#b`), it is an error rather than a guess.
 */
function dotenvValue(gap: string, rest: string, where: string, key: string): string {
  const quote = rest[0];
  if (quote !== '"' && quote !== "'") {
    const unquoted = gap + rest;
    const comment = unquoted.search(/\s#/);
    return (comment < 0 ? unquoted : unquoted.slice(0, comment)).trim();
  }
  let value = '';
  let i = 1;
  for (; i < rest.length && rest[i] !== quote; i++) {
    if (quote === '"' && rest[i] === '\\' && i + 1 < rest.length) {
      const next = rest[i + 1];
      if (next === 'n' || '"\\$`'.includes(next)) {
        value += next === 'n' ? '\n' : next;
        i++;
        continue;
      }
    }
    value += rest[i];
  }
  const kind = quote === '"' ? 'double' : 'single';
  if (i >= rest.length) throw dotenvError(where, `${key}: the ${kind} quote is not closed (a value is one line)`);
  if (!/^(?:\s+#.*)?\s*$/s.test(rest.slice(i + 1))) {
    const why = 'quote the whole value; a comment needs a space before #';
    throw dotenvError(where, `${key}: text after the closing ${kind} quote (${why})`);
  }
  return value;
}

/** Parses a dotenv file: KEY=VALUE, optional `export `, single or double quotes, # comments, CRLF. */
export function parseDotenv(text: string, file: string): Record<string, string> {
  const vars: Record<string, string> = {};
  text
    .replace(/^\uFEFF/, '')
    .split('\n')
    .forEach((raw, i) => {
      const line = raw.endsWith('\r') ? raw.slice(0, -1) : raw;
      if (/^\s*(?:#|$)/.test(line)) return;
      const where = `${file}:${i + 1}`;
      const m = /^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=(\s*)(.*)$/s.exec(line);
      if (!m) throw dotenvError(where, 'not a KEY=VALUE line');
      vars[m[1]] = dotenvValue(m[2], m[3], where, m[1]);
    });
  return vars;
}

function fileKind(st: fs.Stats): string {
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
 * Reads a dotenv file that must be a regular file (a symlink to one is fine). A FIFO would block
 * the read for ever and a device may never end: both are refused from stat before opening, and
 * again from fstat of what was opened (non-blocking, so even a FIFO swapped in between cannot
 * hold the run).
 */
function readEnvFile(file: string, label: string, required: boolean): Record<string, string> {
  const refuse = (why: string) => new UsageError(`${label}: cannot be read (${why})`);
  const notRegular = (st: fs.Stats) =>
    refuse(st.isDirectory() ? 'EISDIR: a directory' : `${fileKind(st)}, not a regular file`);
  let fd: number;
  try {
    const st = fs.statSync(file);
    if (!st.isFile()) throw notRegular(st);
    fd = fs.openSync(file, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK | fs.constants.O_NOCTTY);
  } catch (e) {
    if (e instanceof UsageError) throw e;
    const code = (e as NodeJS.ErrnoException).code;
    if (!required && code === 'ENOENT') return {};
    throw refuse(code ?? (e as Error).message);
  }
  let text: string;
  try {
    const st = fs.fstatSync(fd);
    if (!st.isFile()) throw notRegular(st);
    text = fs.readFileSync(fd, 'utf8');
  } catch (e) {
    if (e instanceof UsageError) throw e;
    throw refuse((e as NodeJS.ErrnoException).code ?? (e as Error).message);
  } finally {
    fs.closeSync(fd);
  }
  return parseDotenv(text, file);
}

/** `~` and `~/x` against HOME, the way the bash originals' defaults read. */
export function expandHome(p: string, home: string): string {
  if (p === '~') return home;
  return p.startsWith('~/') ? path.join(home, p.slice(2)) : p;
}

/** Control characters: they end a line or a C string, or are invisible; never part of a host or an endpoint. */
const CONTROL = /[\x00-\x1f\x7f]/;

// An SSH user name: the portable POSIX set (useradd's), never starting with `-`.
const SSH_USER = /^[A-Za-z0-9_][A-Za-z0-9_.-]*\$?$/;
// A DNS name or an ssh_config Host alias: letters, digits, `_`, `.`, `-`, not at either end.
const HOST_NAME = /^[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?$/;

/** What is wrong with a host name, IPv4 or (bare) IPv6 address, or undefined. */
function hostProblem(host: string): string | undefined {
  if (!host) return 'is empty';
  if (host.includes(':')) return net.isIPv6(host) ? undefined : 'is not a host name or IP address';
  if (!HOST_NAME.test(host) || host.includes('..')) return 'is not a host name or IP address';
  // All digits and dots is an IPv4 address to ssh (inet_aton), so it must be a well-formed one.
  if (/^[0-9.]+$/.test(host) && !net.isIPv4(host)) return 'is not a valid IPv4 address';
  return undefined;
}

/**
 * `local`, an SSH destination `[user@]host` (host: a DNS name, an ssh_config alias, an IPv4
 * address, or an IPv6 one bare or in brackets) or `ssh://[user@]host[:port]`. Returned as ssh
 * takes it: OpenSSH keeps the brackets of a plain `[ipv6]` destination and then cannot resolve
 * it, so they are dropped. Nothing that ssh could read as an option or that is not one host.
 */
export function sshDestination(name: string, value: string): string {
  const expected = 'expected local, [user@]host or ssh://[user@]host[:port]';
  const bad = (why: string) => new UsageError(`${name} ${why} (got ${JSON.stringify(value)}; ${expected})`);
  if (value === 'local') return value;
  if (value.startsWith('-')) throw bad('starts with "-": ssh would read it as an option');
  if (/\s/.test(value) || CONTROL.test(value)) throw bad('holds whitespace or a control character');
  const isUri = value.startsWith('ssh://');
  const m = isUri
    ? /^ssh:\/\/(?:([^@/]*)@)?(\[[^\]]*\]|[^@/:[\]]*)(?::(\d+))?$/.exec(value)
    : /^(?:([^@]*)@)?([^@]*)$/.exec(value);
  if (!m) throw bad(isUri ? 'is not ssh://[user@]host[:port]' : 'has more than one "@"');
  const [, user, rawHost, port] = m;
  if (user !== undefined && !SSH_USER.test(user)) throw bad('has a user name that is empty or not a user name');
  if (port !== undefined && !(Number(port) >= 1 && Number(port) <= 65535)) throw bad('has a port outside 1-65535');
  const bracketed = /^\[(.*)\]$/.exec(rawHost);
  const host = bracketed ? bracketed[1] : rawHost;
  if (bracketed && !net.isIPv6(host)) throw bad('has brackets around something that is not an IPv6 address');
  // OpenSSH's URI parser checks the host as a domain name: an address with colons never passes.
  if (isUri && bracketed) {
    throw bad('has an IPv6 address in an ssh:// URI, which ssh refuses: use user@ADDRESS and a Port in SSH_CONFIG');
  }
  const problem = hostProblem(host);
  if (problem) throw bad(`has a host that ${problem}`);
  return bracketed ? `${user === undefined ? '' : `${user}@`}${host}` : value;
}

// The OCI distribution reference grammar (docker/distribution's reference package), as docker and
// podman parse an image name: [host[:port]/]path[:tag][@digest].
const IMAGE_ALNUM = '[a-z0-9]+';
const IMAGE_PATH = `${IMAGE_ALNUM}(?:(?:[._]|__|-+)${IMAGE_ALNUM})*`;
const IMAGE_DOMAIN_PART = '(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])';
const IMAGE_DOMAIN = `(?:${IMAGE_DOMAIN_PART}(?:\\.${IMAGE_DOMAIN_PART})*|\\[[A-Fa-f0-9:]+\\])(?::[0-9]+)?`;
const IMAGE_REFERENCE = new RegExp(
  `^(?:${IMAGE_DOMAIN}/)?${IMAGE_PATH}(?:/${IMAGE_PATH})*(?::[\\w][\\w.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$`,
);

/** A container image reference or image ID (hex, optionally `sha256:`): never an option, never two words. */
export function checkImageReference(name: string, value: string): string {
  const id = /^(?:sha256:)?[a-f0-9]{12,64}$/.test(value);
  const named = value.split('@')[0].length <= 255 && IMAGE_REFERENCE.test(value);
  if (!id && !named) {
    throw new UsageError(
      `${name} is not an image reference (got ${JSON.stringify(value)}; expected e.g. comfy-multi-worker-1, ` +
        `registry.example:5000/team/worker:v2 or an image ID; repository names are lowercase)`,
    );
  }
  return value;
}

/** What S3 says a bucket name may be, for the message; undefined when `bucket` is one. */
function bucketProblem(bucket: string): string | undefined {
  if (bucket.length < 3 || bucket.length > 63) return 'must be 3 to 63 characters long';
  if (!/^[a-z0-9.-]+$/.test(bucket)) return 'may hold only lowercase letters, digits, "." and "-"';
  if (!/^[a-z0-9].*[a-z0-9]$/.test(bucket)) return 'must start and end with a letter or digit';
  if (bucket.includes('..')) return 'must not hold ".."';
  if (/\.-|-\./.test(bucket)) return 'must not hold ".-" or "-."';
  if (/^\d+\.\d+\.\d+\.\d+$/.test(bucket)) return 'must not be formatted as an IP address';
  if (bucket.startsWith('xn--')) return 'must not start with "xn--"';
  if (bucket.endsWith('-s3alias')) return 'must not end with "-s3alias"';
  return undefined;
}

export function checkBucketName(name: string, bucket: string): string {
  const problem = bucketProblem(bucket);
  if (problem) throw new UsageError(`${name} is not a valid bucket name: ${JSON.stringify(bucket)} ${problem}`);
  return bucket;
}

/**
 * An S3 endpoint: `http(s)://host[:port]`, nothing more. The R2 dashboard shows the bucket's URL
 * (`https://<account>.r2.cloudflarestorage.com/<bucket>`); used as an endpoint, its path would be
 * taken as part of every key and every request would be a 404. Returns the origin.
 */
export function checkEndpoint(
  name: string,
  value: string,
  bucketVar = 'R2_MODELS_BUCKET, R2_CACHE_BUCKET or R2_USER_FILES_BUCKET',
): string {
  if (/\s/.test(value) || CONTROL.test(value)) throw new UsageError(`${name} holds whitespace or a control character`);
  let url: URL;
  try {
    url = new URL(value);
  } catch {
    throw new UsageError(`${name} is not a URL: "${value}"`);
  }
  if (url.protocol !== 'https:' && url.protocol !== 'http:') {
    throw new UsageError(`${name} must be an http(s) URL (got "${url.protocol}")`);
  }
  // Not printed: it may hold a password.
  if (
    url.username ||
    url.password ||
    value
      .slice(url.protocol.length + 2)
      .split('/')[0]
      .includes('@')
  ) {
    const where = 'credentials go in R2_ACCESS_KEY_ID and R2_SECRET_ACCESS_KEY';
    throw new UsageError(`${name} must not hold a user name or password (${where})`);
  }
  if (value.includes('?') || value.includes('#')) {
    throw new UsageError(`${name} must be http(s)://host[:port] without a query or fragment (got "${value}")`);
  }
  if (url.pathname !== '/') {
    const bucket = JSON.stringify(url.pathname.replace(/^\/|\/$/g, ''));
    throw new UsageError(
      `${name} must be http(s)://host[:port] without a path (got "${value}"): ` +
        `the bucket (${bucket}) belongs in ${bucketVar}; the endpoint is ${url.origin}`,
    );
  }
  return url.origin;
}

const LOCAL_DIRS = {
  BACKUP_DIR: 'backupDir',
  MELLO_DATA_DIR: 'melloDataDir',
  SFS_BACKUP_DIR: 'sfsBackupDir',
  COMFYMULTI_STATE_DIR: 'stateDir',
} as const satisfies Record<string, keyof Config>;

/** A directory variable of the machine the script runs on. */
export type LocalDirVariable = keyof typeof LOCAL_DIRS;

/**
 * A directory the script creates when it is missing: what is there must be a directory, and so
 * must the nearest existing parent, or mkdir would fail half-way through the run ("EEXIST",
 * "ENOTDIR") instead of before it. What stat cannot tell (EACCES) is left to the step that writes.
 */
export function requireDirOrAbsent(cfg: Config, name: LocalDirVariable): void {
  const dir = cfg[LOCAL_DIRS[name]];
  for (let at = dir; ; at = path.dirname(at)) {
    let st: fs.Stats;
    try {
      st = fs.statSync(at);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code !== 'ENOENT' && code !== 'ENOTDIR') return;
      if (code === 'ENOENT' && fs.lstatSync(at, { throwIfNoEntry: false })?.isSymbolicLink()) {
        throw new UsageError(`${name}: ${dir} cannot be created: ${at} is a symlink to nothing`);
      }
      if (at === path.dirname(at)) return;
      continue;
    }
    if (st.isDirectory()) return;
    throw new UsageError(
      at === dir
        ? `${name} is not a directory: ${dir} is ${fileKind(st)}`
        : `${name}: ${dir} cannot be created: ${at} is ${fileKind(st)}`,
    );
  }
}

/** A directory the script reads from: it must be there, and be a directory. */
export function requireDir(cfg: Config, name: LocalDirVariable): void {
  const dir = cfg[LOCAL_DIRS[name]];
  let st: fs.Stats;
  try {
    st = fs.statSync(dir);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENOTDIR') throw new UsageError(`${name} does not exist: ${dir}`);
    return; // EACCES and the like: the step that reads says so
  }
  if (!st.isDirectory()) throw new UsageError(`${name} is not a directory: ${dir} is ${fileKind(st)}`);
}

/** The environment over `.env` (or --env-file), unchecked: loadConfig's first step. */
export function mergedEnv(
  processEnv: NodeJS.ProcessEnv,
  scriptDir: string,
  envFile?: string,
): Record<string, string | undefined> {
  const fileVars = envFile
    ? readEnvFile(envFile, `--env-file ${envFile}`, true)
    : readEnvFile(path.join(scriptDir, '.env'), path.join(scriptDir, '.env'), false);
  const env: Record<string, string | undefined> = { ...fileVars };
  for (const [k, v] of Object.entries(processEnv)) if (v !== undefined) env[k] = v;
  return env;
}

/**
 * Loads the configuration. `scriptDir` is where the default `.env` is looked for; `envFile`
 * (from --env-file) replaces it and must exist.
 */
export function loadConfig(processEnv: NodeJS.ProcessEnv, scriptDir: string, envFile?: string): Config {
  const env = mergedEnv(processEnv, scriptDir, envFile);

  const home = env.HOME || os.homedir();
  // XDG: a relative XDG_CACHE_HOME is invalid and ignored.
  if (env.XDG_CACHE_HOME && !path.isAbsolute(env.XDG_CACHE_HOME)) env.XDG_CACHE_HOME = undefined;
  const str = (name: string, fallback: string) => {
    const v = env[name];
    return v === undefined || v === '' ? fallback : v;
  };
  // An absolute path after `~` expansion: a relative one lands wherever the run starts (`/` under cron).
  const absolute = (name: string, raw: string) => {
    if (/[\0\n\r]/.test(raw)) throw new UsageError(`${name} holds a NUL or line break: not a path`);
    const v = expandHome(raw, home);
    if (!path.isAbsolute(v)) {
      const why = raw.startsWith('~') && raw !== v ? ` (HOME is ${JSON.stringify(home)})` : '';
      throw new UsageError(`${name} must be an absolute path (got ${JSON.stringify(raw)}${why})`);
    }
    return v;
  };
  const dir = (name: string, fallback: string) => absolute(name, str(name, fallback));
  // Checked as a path, kept as written: a `~` that another machine's shell expands (Mello's).
  const asWritten = (name: string, fallback: string) => {
    const raw = str(name, fallback);
    absolute(name, raw);
    return raw;
  };

  const keepRaw = str('KEEP_BACKUPS', '10');
  if (!/^\d+$/.test(keepRaw) || Number(keepRaw) < 1) {
    throw new UsageError(`KEEP_BACKUPS must be a whole number of at least 1 (got "${keepRaw}")`);
  }
  const cli = str('CONTAINER_CLI', 'docker');
  if (cli !== 'docker' && cli !== 'podman') {
    throw new UsageError(`CONTAINER_CLI must be docker or podman (got "${cli}")`);
  }
  const sudo = env.VERDA_SUDO === undefined ? 'sudo -n' : env.VERDA_SUDO;
  if (sudo.trim().startsWith('-') || /[\0\n\r]/.test(sudo)) {
    const expected = 'a command and its options, e.g. "sudo -n", or empty';
    throw new UsageError(`VERDA_SUDO must be ${expected} (got ${JSON.stringify(sudo)})`);
  }
  const systemctl = str('VERDA_SYSTEMCTL', 'systemctl');
  if (systemctl.trim().startsWith('-') || !systemctl.trim() || /[\0\n\r]/.test(systemctl)) {
    const expected = 'a command and its options, e.g. "systemctl"';
    throw new UsageError(`VERDA_SYSTEMCTL must be ${expected} (got ${JSON.stringify(systemctl)})`);
  }
  checkImageReference('CONTAINER_IMAGE', str('CONTAINER_IMAGE', 'comfy-multi-worker-1'));
  const staleRaw = str('STALE_HOURS', '26').trim();
  const staleHours = /^(\d+(\.\d*)?|\.\d+)$/.test(staleRaw) ? Number(staleRaw) : NaN;
  if (!(staleHours > 0 && staleHours <= 87_600)) {
    throw new UsageError(`STALE_HOURS must be a number of hours, above 0 and at most 87600 (got "${staleRaw}")`);
  }
  // Every ping URL is checked, used by this script or not, as the R2 settings below are.
  for (const name of NOTIFY_VARIABLES) if (env[name]) checkNotifyUrl(name, env[name]!);
  // R2 settings are checked whether or not this script uses them: a wrong one is wrong everywhere.
  if (env.R2_ENDPOINT) checkEndpoint('R2_ENDPOINT', env.R2_ENDPOINT);
  for (const b of Object.values(BUCKETS)) {
    if (env[b.endpoint]) checkEndpoint(b.endpoint, env[b.endpoint]!, b.name);
    if (env[b.name]) checkBucketName(b.name, env[b.name]!);
  }
  for (const kind of Object.keys(BUCKETS) as BucketKind[]) bucketKeyPair(env, kind);
  const ageRecipients = parseAgeRecipients(env.AGE_RECIPIENTS, home);
  const drillRaw = str('DRILL_MAX_BYTES', '4294967296').trim();
  if (!/^\d+$/.test(drillRaw) || !Number.isSafeInteger(Number(drillRaw)) || Number(drillRaw) < 1) {
    throw new UsageError(`DRILL_MAX_BYTES must be a whole number of bytes, at least 1 (got "${drillRaw}")`);
  }

  return {
    env,
    verdaHost: sshDestination('VERDA_HOST', str('VERDA_HOST', 'dev@verda')),
    melloHost: sshDestination('MELLO_HOST', str('MELLO_HOST', 'dev@mello')),
    sshConfig: env.SSH_CONFIG ? absolute('SSH_CONFIG', env.SSH_CONFIG) : undefined,
    backupDir: dir('BACKUP_DIR', '~/backups/verda'),
    melloDataDir: dir('MELLO_DATA_DIR', '~/projects/comfyui/data'),
    melloScriptsDir: asWritten('MELLO_SCRIPTS_DIR', '~/projects/comfymulti-scripts'),
    verdaSysroot: dir('VERDA_SYSROOT', '/'),
    verdaSudo: sudo.split(/\s+/).filter(Boolean),
    verdaSystemctl: systemctl.split(/\s+/).filter(Boolean),
    verdaHome: dir('VERDA_HOME', '/home/dev'),
    verdaProjectDir: dir('VERDA_PROJECT_DIR', '/home/dev/comfy-multi'),
    verdaModelsDir: dir('VERDA_MODELS_DIR', '/mnt/sfs/models'),
    verdaScriptsDir: dir('VERDA_SCRIPTS_DIR', '/usr/local/bin'),
    sfsBackupDir: dir('SFS_BACKUP_DIR', '/mnt/sfs/cache/backups'),
    containerCli: cli,
    containerImage: str('CONTAINER_IMAGE', 'comfy-multi-worker-1'),
    keepBackups: Number(keepRaw),
    stateDir: dir(
      'COMFYMULTI_STATE_DIR',
      path.join(env.XDG_CACHE_HOME || path.join(home, '.cache'), 'comfymulti-scripts'),
    ),
    staleHours,
    limits: readLimits(env),
    ageRecipients,
    ageIdentityFile: env.AGE_IDENTITY_FILE ? absolute('AGE_IDENTITY_FILE', env.AGE_IDENTITY_FILE) : undefined,
    drillMaxBytes: Number(drillRaw),
    sfsMount: env.SFS_MOUNT === '' ? undefined : absolute('SFS_MOUNT', env.SFS_MOUNT ?? '/mnt/sfs'),
  };
}

/** A bucket's name (its variable, else the default), without needing its endpoint or keys. */
export function bucketName(cfg: Config, kind: BucketKind): string {
  const b = BUCKETS[kind];
  return checkBucketName(b.name, cfg.env[b.name] || b.fallback);
}

/**
 * The endpoint, bucket and credentials of one bucket. Called while the plan is built, so a
 * missing variable stops the run before anything was done.
 */
export function bucketTarget(cfg: Config, kind: BucketKind): BucketTarget {
  const b = BUCKETS[kind];
  const env = cfg.env;
  const endpointVar = env[b.endpoint] ? b.endpoint : 'R2_ENDPOINT';
  const endpoint = env[endpointVar];
  if (!endpoint)
    throw new UsageError(`R2_ENDPOINT is not set (needed for the ${kind} bucket; ${b.endpoint} may override it)`);
  const origin = checkEndpoint(endpointVar, endpoint, b.name);
  const bucket = checkBucketName(b.name, env[b.name] || b.fallback);
  // The bucket's own pair (a token scoped to it), else the shared one.
  const own = bucketKeyPair(env, kind);
  if (own) return { bucket, endpoint: origin, ...own };
  const accessKeyId = env.R2_ACCESS_KEY_ID || env.AWS_ACCESS_KEY_ID;
  const secretAccessKey = env.R2_SECRET_ACCESS_KEY || env.AWS_SECRET_ACCESS_KEY;
  const pair = `${b.keys}_ACCESS_KEY_ID and ${b.keys}_SECRET_ACCESS_KEY may set the ${kind} bucket's own`;
  if (!accessKeyId) throw new UsageError(`R2_ACCESS_KEY_ID (or AWS_ACCESS_KEY_ID) is not set (${pair})`);
  if (!secretAccessKey) throw new UsageError(`R2_SECRET_ACCESS_KEY (or AWS_SECRET_ACCESS_KEY) is not set (${pair})`);
  return { bucket, endpoint: origin, accessKeyId, secretAccessKey };
}
