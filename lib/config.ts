// Configuration: the SPEC's variables with their defaults. The environment wins over `.env`
// beside the scripts (or --env-file). Every problem is a UsageError naming the variable, raised
// before any work starts.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { UsageError } from './cli.ts';

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
}

export const DEFAULT_LIMITS: Limits = {
  r2IdleTimeoutMs: 60_000,
  r2Attempts: 5,
  r2BackoffMs: 500,
  sshTimeoutS: 10,
  commandIdleTimeoutMs: 600_000,
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
  };
}

export interface Config {
  env: Record<string, string | undefined>; // merged view, for the few things read lazily
  verdaHost: string;
  melloHost: string;
  sshConfig?: string;
  backupDir: string;
  melloDataDir: string;
  melloScriptsDir: string;
  verdaSysroot: string;
  verdaSudo: string[];
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
  limits: Limits;
}

const BUCKETS: Record<BucketKind, { name: string; fallback: string; endpoint: string }> = {
  models: { name: 'R2_MODELS_BUCKET', fallback: 'comfy-multi-model-vault-backup', endpoint: 'R2_MODELS_ENDPOINT' },
  cache: { name: 'R2_CACHE_BUCKET', fallback: 'comfy-multi-cache', endpoint: 'R2_CACHE_ENDPOINT' },
  userFiles: { name: 'R2_USER_FILES_BUCKET', fallback: 'comfy-multi-user-files', endpoint: 'R2_USER_FILES_ENDPOINT' },
};

/** Parses a dotenv file: KEY=VALUE, optional `export `, single or double quotes, # comments. */
export function parseDotenv(text: string, file: string): Record<string, string> {
  const vars: Record<string, string> = {};
  text.split(/\r?\n/).forEach((raw, i) => {
    const line = raw.trim();
    if (!line || line.startsWith('#')) return;
    const m = /^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$/.exec(line);
    if (!m) throw new UsageError(`${file}:${i + 1}: not a KEY=VALUE line`);
    let value = m[2];
    const quote = value[0];
    if ((quote === '"' || quote === "'") && value.length >= 2 && value.endsWith(quote)) {
      value = value.slice(1, -1);
      if (quote === '"') value = value.replace(/\\n/g, '\n').replace(/\\(["\\$])/g, '$1');
    } else {
      value = value.replace(/\s+#.*$/, '');
    }
    vars[m[1]] = value;
  });
  return vars;
}

function readEnvFile(file: string, required: boolean): Record<string, string> {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (!required && code === 'ENOENT') return {};
    throw new UsageError(`--env-file ${file}: cannot be read (${code ?? (e as Error).message})`);
  }
  return parseDotenv(text, file);
}

/** `~` and `~/x` against HOME, the way the bash originals' defaults read. */
export function expandHome(p: string, home: string): string {
  if (p === '~') return home;
  return p.startsWith('~/') ? path.join(home, p.slice(2)) : p;
}

/**
 * Loads the configuration. `scriptDir` is where the default `.env` is looked for; `envFile`
 * (from --env-file) replaces it and must exist.
 */
export function loadConfig(processEnv: NodeJS.ProcessEnv, scriptDir: string, envFile?: string): Config {
  const fileVars = envFile ? readEnvFile(envFile, true) : readEnvFile(path.join(scriptDir, '.env'), false);
  const env: Record<string, string | undefined> = { ...fileVars };
  for (const [k, v] of Object.entries(processEnv)) if (v !== undefined) env[k] = v;

  const home = env.HOME || os.homedir();
  const str = (name: string, fallback: string) => {
    const v = env[name];
    return v === undefined || v === '' ? fallback : v;
  };
  const dir = (name: string, fallback: string) => {
    const v = expandHome(str(name, fallback), home);
    if (v.includes('\0')) throw new UsageError(`${name}: not a path`);
    return v;
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

  return {
    env,
    verdaHost: str('VERDA_HOST', 'dev@verda'),
    melloHost: str('MELLO_HOST', 'dev@mello'),
    sshConfig: env.SSH_CONFIG ? expandHome(env.SSH_CONFIG, home) : undefined,
    backupDir: dir('BACKUP_DIR', '~/backups/verda'),
    melloDataDir: dir('MELLO_DATA_DIR', '~/projects/comfyui/data'),
    melloScriptsDir: dir('MELLO_SCRIPTS_DIR', '~/projects/comfymulti-scripts'),
    verdaSysroot: dir('VERDA_SYSROOT', '/'),
    verdaSudo: sudo.split(/\s+/).filter(Boolean),
    verdaHome: dir('VERDA_HOME', '/home/dev'),
    verdaProjectDir: dir('VERDA_PROJECT_DIR', '/home/dev/comfy-multi'),
    verdaModelsDir: dir('VERDA_MODELS_DIR', '/mnt/sfs/models'),
    verdaScriptsDir: dir('VERDA_SCRIPTS_DIR', '/usr/local/bin'),
    sfsBackupDir: dir('SFS_BACKUP_DIR', '/mnt/sfs/cache/backups'),
    containerCli: cli,
    containerImage: str('CONTAINER_IMAGE', 'comfy-multi-worker-1'),
    keepBackups: Number(keepRaw),
    stateDir: dir('COMFYMULTI_STATE_DIR', path.join(env.XDG_CACHE_HOME || path.join(home, '.cache'), 'comfymulti-scripts')),
    limits: readLimits(env),
  };
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
  if (!endpoint) throw new UsageError(`R2_ENDPOINT is not set (needed for the ${kind} bucket; ${b.endpoint} may override it)`);
  let url: URL;
  try {
    url = new URL(endpoint);
  } catch {
    throw new UsageError(`${endpointVar} is not a URL: "${endpoint}"`);
  }
  if (url.protocol !== 'https:' && url.protocol !== 'http:') {
    throw new UsageError(`${endpointVar} must be an http(s) URL (got "${url.protocol}")`);
  }
  const accessKeyId = env.R2_ACCESS_KEY_ID || env.AWS_ACCESS_KEY_ID;
  const secretAccessKey = env.R2_SECRET_ACCESS_KEY || env.AWS_SECRET_ACCESS_KEY;
  if (!accessKeyId) throw new UsageError('R2_ACCESS_KEY_ID (or AWS_ACCESS_KEY_ID) is not set');
  if (!secretAccessKey) throw new UsageError('R2_SECRET_ACCESS_KEY (or AWS_SECRET_ACCESS_KEY) is not set');
  const bucket = env[b.name] || b.fallback;
  if (!/^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/.test(bucket)) throw new UsageError(`${b.name} is not a valid bucket name: "${bucket}"`);
  return { bucket, endpoint: url.toString().replace(/\/$/, ''), accessKeyId, secretAccessKey };
}
