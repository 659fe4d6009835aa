// Configuration: the variables of lib/variables.ts (names, defaults), read and checked. The
// environment wins over `.env` beside the scripts (or --env-file). Every problem is a UsageError
// naming the variable, raised before any work starts.
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { parseAgeRecipients, type AgeRecipients } from './age.ts';
import { UsageError, nameDirectories } from './cli.ts';
import { fileKind } from './files.ts';
import { NOTIFY_VARIABLES, checkNotifyUrl } from './notify.ts';
import { defaultOf, dotenvNameWarning, type VariableName } from './variables.ts';

export interface BucketTarget {
  bucket: string;
  endpoint: string;
  accessKeyId: string;
  secretAccessKey: string;
  /**
   * The variables each value came from, as bucketTarget found them: an error names the one in
   * use (R2_CACHE_ACCESS_KEY_ID, not R2_ACCESS_KEY_ID). Names only, never values.
   */
  variables?: TargetVariables;
}

interface TargetVariables {
  /** R2_CACHE_BUCKET. */
  bucket: string;
  /** The variable the endpoint came from: R2_CACHE_ENDPOINT or R2_ENDPOINT. */
  endpoint: string;
  /** The bucket's own endpoint variable, where an EU bucket's endpoint goes (R2_USER_FILES_ENDPOINT). */
  ownEndpoint: string;
  accessKeyId: string;
  secretAccessKey: string;
}

export type BucketKind = 'models' | 'cache' | 'userFiles' | 'versions';

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

const defaultSeconds = (name: VariableName) => Number(defaultOf(name));

/** The table's defaults (lib/variables.ts), in the units the code counts in. */
export const DEFAULT_LIMITS: Limits = {
  r2IdleTimeoutMs: defaultSeconds('COMFYMULTI_R2_TIMEOUT') * 1000,
  r2Attempts: Number(defaultOf('COMFYMULTI_R2_ATTEMPTS')),
  r2BackoffMs: defaultSeconds('COMFYMULTI_R2_BACKOFF') * 1000,
  sshTimeoutS: defaultSeconds('COMFYMULTI_SSH_TIMEOUT'),
  commandIdleTimeoutMs: defaultSeconds('COMFYMULTI_COMMAND_TIMEOUT') * 1000,
  notifyTimeoutMs: defaultSeconds('COMFYMULTI_NOTIFY_TIMEOUT') * 1000,
};

/** Seconds as a variable may give them: digits, decimals allowed (`.5`, `2.`); NaN otherwise. */
function parseSeconds(raw: string): number {
  return /^(\d+(\.\d*)?|\.\d+)$/.test(raw) ? Number(raw) : NaN;
}

/** The limits from COMFYMULTI_R2_TIMEOUT and its siblings; unset or empty keeps the default. */
export function readLimits(env: Record<string, string | undefined>): Limits {
  const value = (name: VariableName) => {
    const raw = env[name]?.trim();
    return raw ? raw : undefined;
  };
  // Seconds, decimals allowed; at most a day, beyond which Node's timers would fire at once.
  const secondsOf = (name: VariableName, fallbackS: number, zero: boolean) => {
    const raw = value(name);
    if (raw === undefined) return fallbackS;
    const s = parseSeconds(raw);
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
  const ms = (name: VariableName, fallbackMs: number, zero = false) => {
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
  /** SFS_MOUNT (/mnt/sfs): must be a mount point on Verda for the steps under it; undefined (`SFS_MOUNT=`): no check. */
  sfsMount?: string;
  /** DRILL_MAX_BYTES (4 GiB): what a drill may unpack on Mello in all. */
  drillMaxBytes: number;
  /** STATS_INTERVAL (60): seconds between stats lines of a long step when stdout is not a terminal. */
  statsIntervalS: number;
  /** KEEP_VERSIONS_DAYS (30): days replaced versions are kept in the versions bucket. */
  keepVersionsDays: number;
  /** R2_VERSIONS_BUCKET: where replaced users' files are kept; undefined: versions are off. */
  versionsBucket?: string;
  /**
   * The default `.env` that was looked for and is not there (undefined when one was read, or
   * --env-file given): a default that fails says so (see defaultHint).
   */
  missingDotenv?: string;
}

type KeyPair = 'models' | 'cache' | 'userFiles';

const KEY_PAIRS: Record<KeyPair, { id: VariableName; secret: VariableName }> = {
  models: { id: 'R2_MODELS_ACCESS_KEY_ID', secret: 'R2_MODELS_SECRET_ACCESS_KEY' },
  cache: { id: 'R2_CACHE_ACCESS_KEY_ID', secret: 'R2_CACHE_SECRET_ACCESS_KEY' },
  userFiles: { id: 'R2_USER_FILES_ACCESS_KEY_ID', secret: 'R2_USER_FILES_SECRET_ACCESS_KEY' },
};

/**
 * Each bucket: its variable, its endpoint variables in the order they are tried (R2_ENDPOINT
 * last), and whose key pair signs its requests. The versions bucket takes the user-files pair: a
 * server-side copy is one request, signed by one key that reads one bucket and writes the other.
 */
const BUCKETS: Record<BucketKind, { name: VariableName; endpoints: VariableName[]; keys: KeyPair }> = {
  models: { name: 'R2_MODELS_BUCKET', endpoints: ['R2_MODELS_ENDPOINT', 'R2_ENDPOINT'], keys: 'models' },
  cache: { name: 'R2_CACHE_BUCKET', endpoints: ['R2_CACHE_ENDPOINT', 'R2_ENDPOINT'], keys: 'cache' },
  userFiles: {
    name: 'R2_USER_FILES_BUCKET',
    endpoints: ['R2_USER_FILES_ENDPOINT', 'R2_ENDPOINT'],
    keys: 'userFiles',
  },
  versions: {
    name: 'R2_VERSIONS_BUCKET',
    endpoints: ['R2_VERSIONS_ENDPOINT', 'R2_USER_FILES_ENDPOINT', 'R2_ENDPOINT'],
    keys: 'userFiles',
  },
};

/**
 * A bucket's own key pair (`R2_MODELS_ACCESS_KEY_ID` and `R2_MODELS_SECRET_ACCESS_KEY`), or
 * undefined when neither is set (the bucket then uses R2_ACCESS_KEY_ID / R2_SECRET_ACCESS_KEY).
 * Half a pair is a UsageError naming the missing half: it would silently fall back otherwise.
 */
function bucketKeyPair(env: Record<string, string | undefined>, pair: KeyPair) {
  const { id: idVar, secret: secretVar } = KEY_PAIRS[pair];
  const accessKeyId = env[idVar];
  const secretAccessKey = env[secretVar];
  if (!accessKeyId && !secretAccessKey) return undefined;
  if (!secretAccessKey)
    throw new UsageError(
      `${secretVar} is not set, but ${idVar} is: set both (the ${pair} bucket's key pair) or neither`,
    );
  if (!accessKeyId)
    throw new UsageError(
      `${idVar} is not set, but ${secretVar} is: set both (the ${pair} bucket's key pair) or neither`,
    );
  return { accessKeyId, secretAccessKey, variables: { accessKeyId: idVar, secretAccessKey: secretVar } };
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

/** Each assignment of a dotenv file, in order, with where it stands (`file:line`). */
function dotenvAssignments(text: string, file: string): { key: string; value: string; where: string }[] {
  const assignments: { key: string; value: string; where: string }[] = [];
  text
    .replace(/^\uFEFF/, '')
    .split('\n')
    .forEach((raw, i) => {
      const line = raw.endsWith('\r') ? raw.slice(0, -1) : raw;
      if (/^\s*(?:#|$)/.test(line)) return;
      const where = `${file}:${i + 1}`;
      const m = /^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=(\s*)(.*)$/s.exec(line);
      if (!m) throw dotenvError(where, 'not a KEY=VALUE line');
      assignments.push({ key: m[1], value: dotenvValue(m[2], m[3], where, m[1]), where });
    });
  return assignments;
}

/** Parses a dotenv file: KEY=VALUE, optional `export `, single or double quotes, # comments, CRLF. */
export function parseDotenv(text: string, file: string): Record<string, string> {
  const vars: Record<string, string> = {};
  for (const a of dotenvAssignments(text, file)) vars[a.key] = a.value;
  return vars;
}

/**
 * The warnings for the names a dotenv file sets that no script reads from there (a misspelling:
 * `VERDA_HOTS`, "did you mean VERDA_HOST?"), one per name. The environment's names are never
 * checked: it holds everyone's variables.
 */
export function dotenvWarnings(text: string, file: string): string[] {
  const seen = new Set<string>();
  const warnings: string[] = [];
  for (const { key, where } of dotenvAssignments(text, file)) {
    if (seen.has(key)) continue;
    seen.add(key);
    const warning = dotenvNameWarning(key, where);
    if (warning) warnings.push(warning);
  }
  return warnings;
}

/**
 * Reads a dotenv file that must be a regular file (a symlink to one is fine). A FIFO would block
 * the read for ever and a device may never end: both are refused from stat before opening, and
 * again from fstat of what was opened (non-blocking, so even a FIFO swapped in between cannot
 * hold the run).
 */
function readEnvFile(file: string, label: string, required: boolean): string | undefined {
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
    if (!required && code === 'ENOENT') return undefined;
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
  return text;
}

/** `~` and `~/x` against HOME, the way the bash originals' defaults read. */
function expandHome(p: string, home: string): string {
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
      (at === dir
        ? `${name} is not a directory: ${dir} is ${fileKind(st)}`
        : `${name}: ${dir} cannot be created: ${at} is ${fileKind(st)}`) + defaultHint(cfg, name),
    );
  }
}

/**
 * `no .env at PATH` when `name` is unset and the default `.env` was looked for and is not there,
 * else undefined. A missing `.env` otherwise surfaces as a default that does not fit the machine
 * ("MELLO_DATA_DIR does not exist: /root/...") or a variable that is not set.
 */
function noDotenv(cfg: Pick<Config, 'env' | 'missingDotenv'>, name: VariableName): string | undefined {
  const unset = cfg.env[name] === undefined || cfg.env[name] === '';
  return unset && cfg.missingDotenv ? `no .env at ${cfg.missingDotenv}` : undefined;
}

/** What to add to a message about a variable whose default failed: ` (the default; no .env at PATH)`, or nothing. */
function defaultHint(cfg: Pick<Config, 'env' | 'missingDotenv'>, name: VariableName): string {
  const why = noDotenv(cfg, name);
  return why ? ` (the default; ${why})` : '';
}

/** A directory the script reads from: it must be there, and be a directory. */
export function requireDir(cfg: Config, name: LocalDirVariable): void {
  const dir = cfg[LOCAL_DIRS[name]];
  let st: fs.Stats;
  try {
    st = fs.statSync(dir);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENOTDIR') {
      throw new UsageError(`${name} does not exist: ${dir}${defaultHint(cfg, name)}`);
    }
    return; // EACCES and the like: the step that reads says so
  }
  if (!st.isDirectory()) throw new UsageError(`${name} is not a directory: ${dir} is ${fileKind(st)}`);
}

interface MergedEnv {
  env: Record<string, string | undefined>;
  /** The default `.env` looked for and not found; undefined when a file was read. */
  missing?: string;
  /** Names the file sets that no script reads from it (see dotenvWarnings). */
  warnings: string[];
}

function readMergedEnv(processEnv: NodeJS.ProcessEnv, scriptDir: string, envFile?: string): MergedEnv {
  const file = envFile ?? path.join(scriptDir, '.env');
  const text = readEnvFile(file, envFile ? `--env-file ${envFile}` : file, Boolean(envFile));
  const env: Record<string, string | undefined> = text === undefined ? {} : parseDotenv(text, file);
  for (const [k, v] of Object.entries(processEnv)) if (v !== undefined) env[k] = v;
  const warnings = text === undefined ? [] : dotenvWarnings(text, file);
  return { env, missing: text === undefined ? file : undefined, warnings };
}

/** The environment over `.env` (or --env-file), unchecked: loadConfig's first step. */
export function mergedEnv(
  processEnv: NodeJS.ProcessEnv,
  scriptDir: string,
  envFile?: string,
): Record<string, string | undefined> {
  return readMergedEnv(processEnv, scriptDir, envFile).env;
}

export interface LoadOptions {
  /**
   * Told each warning about the `.env` (a name no script reads, with the nearest known one),
   * before anything is checked: a configuration error that follows does not hide it.
   */
  warn?: (text: string) => void;
}

/**
 * Loads the configuration. `scriptDir` is where the default `.env` is looked for; `envFile`
 * (from --env-file) replaces it and must exist. Also tells errorText (lib/cli.ts) which variable
 * names each directory of this machine, so an EACCES or ENOSPC there names it.
 */
export function loadConfig(
  processEnv: NodeJS.ProcessEnv,
  scriptDir: string,
  envFile?: string,
  opts: LoadOptions = {},
): Config {
  const merged = readMergedEnv(processEnv, scriptDir, envFile);
  for (const w of merged.warnings) opts.warn?.(w);
  const env = merged.env;

  const home = env.HOME || os.homedir();
  // XDG: a relative XDG_CACHE_HOME is invalid and ignored.
  if (env.XDG_CACHE_HOME && !path.isAbsolute(env.XDG_CACHE_HOME)) env.XDG_CACHE_HOME = undefined;
  const str = (name: VariableName, fallback = defaultOf(name)) => {
    const v = env[name];
    return v === undefined || v === '' ? fallback : v;
  };
  // An absolute path after `~` expansion: a relative one lands wherever the run starts (`/` under cron).
  const absolute = (name: VariableName, raw: string) => {
    if (/[\0\n\r]/.test(raw)) throw new UsageError(`${name} holds a NUL or line break: not a path`);
    const v = expandHome(raw, home);
    if (!path.isAbsolute(v)) {
      const why = raw.startsWith('~') && raw !== v ? ` (HOME is ${JSON.stringify(home)})` : '';
      throw new UsageError(`${name} must be an absolute path (got ${JSON.stringify(raw)}${why})`);
    }
    return v;
  };
  const dir = (name: VariableName, fallback?: string) => absolute(name, str(name, fallback));
  // Checked as a path, kept as written: a `~` that another machine's shell expands (Mello's).
  const asWritten = (name: VariableName) => {
    const raw = str(name);
    absolute(name, raw);
    return raw;
  };
  // A whole number from `min` to `max`.
  const whole = (name: VariableName, min: number, max: number) => {
    const raw = str(name); // untrimmed: "3 " is not a whole number
    const n = /^\d+$/.test(raw) ? Number(raw) : NaN;
    if (!(n >= min && n <= max)) {
      const range = max === Number.MAX_SAFE_INTEGER ? `of at least ${min}` : `from ${min} to ${max}`;
      throw new UsageError(`${name} must be a whole number ${range} (got "${raw}")`);
    }
    return n;
  };

  const keepBackups = whole('KEEP_BACKUPS', 1, Number.MAX_SAFE_INTEGER);
  const cli = str('CONTAINER_CLI');
  if (cli !== 'docker' && cli !== 'podman') {
    throw new UsageError(`CONTAINER_CLI must be docker or podman (got "${cli}")`);
  }
  // Empty is a value here: no sudo.
  const sudo = env.VERDA_SUDO === undefined ? defaultOf('VERDA_SUDO') : env.VERDA_SUDO;
  if (sudo.trim().startsWith('-') || /[\0\n\r]/.test(sudo)) {
    const expected = 'a command and its options, e.g. "sudo -n", or empty';
    throw new UsageError(`VERDA_SUDO must be ${expected} (got ${JSON.stringify(sudo)})`);
  }
  const systemctl = str('VERDA_SYSTEMCTL');
  if (systemctl.trim().startsWith('-') || !systemctl.trim() || /[\0\n\r]/.test(systemctl)) {
    const expected = 'a command and its options, e.g. "systemctl"';
    throw new UsageError(`VERDA_SYSTEMCTL must be ${expected} (got ${JSON.stringify(systemctl)})`);
  }
  checkImageReference('CONTAINER_IMAGE', str('CONTAINER_IMAGE'));
  const staleRaw = str('STALE_HOURS').trim();
  const staleHours = parseSeconds(staleRaw);
  if (!(staleHours > 0 && staleHours <= 87_600)) {
    throw new UsageError(`STALE_HOURS must be a number of hours, above 0 and at most 87600 (got "${staleRaw}")`);
  }
  const statsRaw = str('STATS_INTERVAL').trim();
  const statsIntervalS = parseSeconds(statsRaw);
  if (!(statsIntervalS > 0 && statsIntervalS <= 86_400)) {
    throw new UsageError(`STATS_INTERVAL must be a number of seconds, above 0 and at most 86400 (got "${statsRaw}")`);
  }
  const drillMaxBytes = whole('DRILL_MAX_BYTES', 1, Number.MAX_SAFE_INTEGER);
  const keepVersionsDays = whole('KEEP_VERSIONS_DAYS', 1, 36_500);
  // Unset: the default; empty: no check (tests, a Verda without SFS). A Verda path, compared
  // with others, so without a trailing slash.
  const sfsMount = env.SFS_MOUNT === '' ? undefined : path.resolve(absolute('SFS_MOUNT', str('SFS_MOUNT')));
  // Every ping URL is checked, used by this script or not, as the R2 settings below are.
  for (const name of NOTIFY_VARIABLES) if (env[name]) checkNotifyUrl(name, env[name]!);
  // R2 settings are checked whether or not this script uses them: a wrong one is wrong everywhere.
  if (env.R2_ENDPOINT) checkEndpoint('R2_ENDPOINT', env.R2_ENDPOINT);
  for (const b of Object.values(BUCKETS)) {
    const own = b.endpoints[0];
    if (env[own]) checkEndpoint(own, env[own]!, b.name);
    if (env[b.name]) checkBucketName(b.name, env[b.name]!);
  }
  for (const pair of Object.keys(KEY_PAIRS) as KeyPair[]) bucketKeyPair(env, pair);
  const ageRecipients = parseAgeRecipients(env.AGE_RECIPIENTS, home);

  const cfg: Config = {
    env,
    verdaHost: sshDestination('VERDA_HOST', str('VERDA_HOST')),
    melloHost: sshDestination('MELLO_HOST', str('MELLO_HOST')),
    sshConfig: env.SSH_CONFIG ? absolute('SSH_CONFIG', env.SSH_CONFIG) : undefined,
    backupDir: dir('BACKUP_DIR'),
    melloDataDir: dir('MELLO_DATA_DIR'),
    melloScriptsDir: asWritten('MELLO_SCRIPTS_DIR'),
    verdaSysroot: dir('VERDA_SYSROOT'),
    verdaSudo: sudo.split(/\s+/).filter(Boolean),
    verdaSystemctl: systemctl.split(/\s+/).filter(Boolean),
    verdaHome: dir('VERDA_HOME'),
    verdaProjectDir: dir('VERDA_PROJECT_DIR'),
    verdaModelsDir: dir('VERDA_MODELS_DIR'),
    sfsBackupDir: dir('SFS_BACKUP_DIR'),
    containerCli: cli,
    containerImage: str('CONTAINER_IMAGE'),
    keepBackups,
    // The table's default (~/.cache/comfymulti-scripts), under XDG_CACHE_HOME when that is set.
    stateDir: dir(
      'COMFYMULTI_STATE_DIR',
      env.XDG_CACHE_HOME ? path.join(env.XDG_CACHE_HOME, 'comfymulti-scripts') : undefined,
    ),
    staleHours,
    limits: readLimits(env),
    ageRecipients,
    ageIdentityFile: env.AGE_IDENTITY_FILE ? absolute('AGE_IDENTITY_FILE', env.AGE_IDENTITY_FILE) : undefined,
    sfsMount,
    drillMaxBytes,
    statsIntervalS,
    keepVersionsDays,
    versionsBucket: env.R2_VERSIONS_BUCKET || undefined,
    missingDotenv: merged.missing,
  };
  nameDirectories(Object.entries(LOCAL_DIRS).map(([name, field]) => [name, cfg[field]]));
  return cfg;
}

/** A bucket's name (its variable, else the default), without needing its endpoint or keys. */
export function bucketName(cfg: Config, kind: BucketKind): string {
  const b = BUCKETS[kind];
  return checkBucketName(b.name, cfg.env[b.name] || defaultOf(b.name));
}

/**
 * The endpoint, bucket and credentials of one bucket. Called while the plan is built, so a
 * missing variable stops the run before anything was done.
 */
export function bucketTarget(cfg: Config, kind: BucketKind): BucketTarget {
  const b = BUCKETS[kind];
  const env = cfg.env;
  // Not set, with no .env found: that is likely why.
  const unset = (name: VariableName, why: string) => {
    const missing = noDotenv(cfg, name);
    return new UsageError(`${name} is not set (${missing ? `${missing}; ` : ''}${why})`);
  };
  if (kind === 'versions' && !env[b.name]) throw unset(b.name, "versions of the users' files are off");
  const endpointVar = b.endpoints.find((name) => env[name]);
  if (!endpointVar) {
    const others = b.endpoints.slice(0, -1).join(' or ');
    throw unset('R2_ENDPOINT', `needed for the ${kind} bucket; ${others} may override it`);
  }
  const origin = checkEndpoint(endpointVar, env[endpointVar]!, b.name);
  const bucket = checkBucketName(b.name, env[b.name] || defaultOf(b.name));
  const where = { bucket: b.name, endpoint: endpointVar, ownEndpoint: b.endpoints[0] };
  // The bucket's own pair (a token scoped to it), else the shared one.
  const own = bucketKeyPair(env, b.keys);
  if (own) return { bucket, endpoint: origin, ...own, variables: { ...where, ...own.variables } };
  const idVar = env.R2_ACCESS_KEY_ID ? 'R2_ACCESS_KEY_ID' : 'AWS_ACCESS_KEY_ID';
  const secretVar = env.R2_SECRET_ACCESS_KEY ? 'R2_SECRET_ACCESS_KEY' : 'AWS_SECRET_ACCESS_KEY';
  const accessKeyId = env[idVar];
  const secretAccessKey = env[secretVar];
  const { id, secret } = KEY_PAIRS[b.keys];
  const pair = `${id} and ${secret} may set the ${kind} bucket's own`;
  if (!accessKeyId) throw unset('R2_ACCESS_KEY_ID', `nor AWS_ACCESS_KEY_ID; ${pair}`);
  if (!secretAccessKey) throw unset('R2_SECRET_ACCESS_KEY', `nor AWS_SECRET_ACCESS_KEY; ${pair}`);
  const variables = { ...where, accessKeyId: idVar, secretAccessKey: secretVar };
  return { bucket, endpoint: origin, accessKeyId, secretAccessKey, variables };
}
