// Command line and output: the SPEC's flags, exit codes, step lines like the bash originals
// (`Step 3: ...`, `✓ ... (4.0K)`), and progress with rate and ETA on a terminal only.
import minimist from 'minimist';
import { isStamp } from './dated.ts';
import { variablesHelp } from './variables.ts';

export const EXIT = { ok: 0, failed: 1, usage: 2, locked: 75 } as const;

/**
 * Exits once stdout and stderr have handed everything to the OS: into a pipe, Node writes
 * asynchronously, and a bare process.exit() would cut a long --json summary short.
 */
export async function exitAfterOutput(code: number): Promise<never> {
  await Promise.all([process.stdout, process.stderr].map((s) => new Promise((resolve) => s.write('', resolve))));
  process.exit(code);
}

/** What the admin should know about the run as a whole (a skewed clock): summary ⚠ lines, --json `notices`. */
export const notices = new Set<string>();
export const addNotice = (text: string) => void notices.add(text);

/** Usage or configuration error: exit 2, nothing was done. */
export class UsageError extends Error {}

export interface Flags {
  quick: boolean;
  dryRun: boolean;
  verify: boolean;
  /** Read what is there and change nothing: the newest backups, their age, complete or not. */
  status: boolean;
  /** Change nothing: the restore points (backup-cron: its SFS copies), newest first. */
  list: boolean;
  /** With --verify: read R2 objects back instead of trusting their metadata. */
  deep: boolean;
  json: boolean;
  verbose: boolean;
  help: boolean;
  envFile?: string;
  /** Flags a script adds for itself (e.g. backup-verda's internal --remote-models). */
  extra: Record<string, unknown>;
}

const BOOLEAN_FLAGS = ['quick', 'full', 'dry-run', 'verify', 'status', 'list', 'deep', 'json', 'verbose', 'help'];

/** The flags a script adds for itself, and the rules between them: declared here, beside the common ones. */
export interface ExtraFlags {
  boolean?: string[];
  string?: string[];
  /** A value's reading: what the plan gets, or a UsageError naming the flag. */
  values?: Record<string, (raw: string) => unknown>;
  /** Flags that do not go together; the second may be `flag=value` (`from=sfs`). */
  notTogether?: [flag: string, other: string, why: string][];
}

/** Where a restore reads its archives: a manifest in BACKUP_DIR (the newest whole one, or T's), SFS or R2. */
export type FromWhere = { from: 'manifest'; stamp?: string } | { from: 'sfs' } | { from: 'r2' };

const absolutePath = (flag: string) => (raw: string) => {
  if (!raw.startsWith('/') || /[\0\n\r]/.test(raw))
    throw new UsageError(`--${flag} must be an absolute path (got ${JSON.stringify(raw)})`);
  return raw;
};

/** restore-verda's own flags. */
export const RESTORE_VERDA_FLAGS: ExtraFlags = {
  boolean: ['skip-image', 'skip-models', 'drill', 'new-host'],
  string: ['from', 'only', 'root'],
  values: {
    from: (raw): FromWhere => {
      if (raw === 'sfs' || raw === 'r2') return { from: raw };
      if (isStamp(raw)) return { from: 'manifest', stamp: raw };
      throw new UsageError(
        `--from must be a backup's timestamp YYYYMMDD-HHMMSS, sfs or r2 (got ${JSON.stringify(raw)})`,
      );
    },
    only: (raw) => raw.split(',').map((k) => k.trim()),
    root: absolutePath('root'),
  },
  notTogether: [
    ['drill', 'from=sfs', 'the drill restores a backup of BACKUP_DIR'],
    ['drill', 'from=r2', 'the drill restores a backup of BACKUP_DIR'],
    ['drill', 'root', 'the drill restores into a temporary root of its own'],
    ['drill', 'dry-run', 'the drill changes nothing already'],
    ['drill', 'verify', 'the drill is the deeper check'],
    ['verify', 'from=sfs', '--verify checks a backup of BACKUP_DIR'],
    ['verify', 'from=r2', '--verify checks a backup of BACKUP_DIR'],
    ['new-host', 'drill', 'the drill runs on Mello alone, without connecting to Verda'],
    ['new-host', 'verify', '--verify runs on Mello alone, without connecting to Verda'],
    ...['drill', 'verify', 'dry-run', 'from', 'root', 'only', 'skip-image', 'skip-models', 'new-host'].map(
      (other): [string, string, string] => ['list', other, '--list only lists the restore points'],
    ),
  ],
};

export function parseFlags(argv: string[], extra: ExtraFlags = {}): Flags {
  const unknown: string[] = [];
  const stringFlags = ['env-file', ...(extra.string ?? [])];
  const args = minimist(argv, {
    boolean: [...BOOLEAN_FLAGS, ...(extra.boolean ?? [])],
    string: stringFlags,
    alias: { v: 'verbose', h: 'help' },
    unknown: (arg) => {
      unknown.push(arg);
      return false;
    },
  });
  if (unknown.length) {
    const what = unknown[0].startsWith('-') ? 'unknown flag' : 'unexpected argument';
    throw new UsageError(`${what}: ${unknown[0]} (see --help)`);
  }
  for (const name of stringFlags) {
    const v = args[name];
    if (Array.isArray(v)) throw new UsageError(`--${name} given more than once`);
    if (v === '') {
      throw new UsageError(`--${name} needs a value`);
    }
  }
  if (args.quick && args.full) throw new UsageError('--quick and --full cannot be used together');
  if (args.verify && args['dry-run']) throw new UsageError('--verify and --dry-run cannot be used together');
  if (args.status && (args['dry-run'] || args.verify)) {
    throw new UsageError(`--status and --${args.verify ? 'verify' : 'dry-run'} cannot be used together`);
  }
  const alone = ['dry-run', 'verify', 'status'].find((f) => args[f]);
  if (args.list && alone) throw new UsageError(`--list and --${alone} cannot be used together`);
  if (args.deep && !args.verify) throw new UsageError('--deep goes with --verify');
  const given = (flag: string) => {
    const [name, value] = flag.split('=');
    return value === undefined ? Boolean(args[name]) && args[name] !== '' : args[name] === value;
  };
  for (const [flag, other, why] of extra.notTogether ?? []) {
    if (given(flag) && given(other))
      throw new UsageError(`--${flag} and --${other.replace('=', ' ')} cannot be used together: ${why}`);
  }
  const extraValues: Flags['extra'] = {};
  for (const name of [...(extra.boolean ?? []), ...(extra.string ?? [])]) {
    const raw = args[name];
    const read = extra.values?.[name];
    extraValues[name] = read && typeof raw === 'string' ? read(raw) : raw;
  }
  return {
    quick: Boolean(args.quick),
    dryRun: Boolean(args['dry-run']),
    verify: Boolean(args.verify),
    status: Boolean(args.status),
    list: Boolean(args.list),
    deep: Boolean(args.deep),
    json: Boolean(args.json),
    verbose: Boolean(args.verbose),
    help: Boolean(args.help),
    envFile: args['env-file'] || undefined,
    extra: extraValues,
  };
}

/** The flags every script takes, each with its lines of help, in the words of `script`. */
const commonFlags = (script: string): [flag: string, help: string][] => [
  ['--full', '  --full            full run (the default)'],
  ['--quick', '  --quick           see above'],
  [
    '--dry-run',
    `  --dry-run         say what would be ${script.startsWith('restore-') ? 'restored' : 'sent'} and where; change nothing`,
  ],
  [
    '--verify',
    '  --verify          change nothing; check that the newest backup is whole (exit 1 naming what differs)',
  ],
  ['--deep', '  --deep            with --verify: read R2 objects back and hash them, not only their metadata'],
  [
    '--status',
    script === 'backup-verda'
      ? `  --status          change nothing, no SSH, no lock: the newest backups and the bundle in R2 (read
                    only), their age, complete or not, and the last run; exit 1 when the newest is
                    older than STALE_HOURS, incomplete or missing, or the last run failed`
      : `  --status          change nothing, no SSH, no lock: the newest backups, their age, complete or not,
                    and the last run; exit 1 when the newest is older than STALE_HOURS, incomplete
                    or missing, or the last run failed`,
  ],
  [
    '--list',
    script === 'backup-cron'
      ? '  --list            change nothing: the dated copies in SFS_BACKUP_DIR, newest first (restore-verda.mts\n                    --from sfs takes the newest of each kind)'
      : `  --list            change nothing: the restore points, newest first (date, full or quick, whole
                    or not and why, size, where)`,
  ],
  ['--json', '  --json            machine-readable summary on stdout (step lines go to stderr)'],
  ['--verbose', '  -v, --verbose     say more'],
  ['--env-file', '  --env-file PATH   read configuration from PATH instead of .env beside the script'],
  ['--help', '  -h, --help        this text'],
];

/**
 * A script's `--help`: its usage, the common flags it takes and does not describe itself (each
 * flag once; `--status` and `--list` only where there are; `--full` and `--quick` only where the
 * usage's synopsis names `--quick`), exit codes, pings, and the variables it reads with their
 * defaults (from lib/variables.ts).
 */
export function helpText(
  script: string,
  usage: string,
  opts: { status: boolean; list: boolean; failurePingsOnly?: boolean },
): string {
  const ownLines = usage.split('\n').filter((line) => /^\s+-/.test(line));
  const synopsis = usage.split('\n\n')[0];
  const describedHere = (flag: string) => ownLines.some((line) => new RegExp(`^\\s+${flag}(?![\\w-])`).test(line));
  const takes = (flag: string) =>
    (opts.status || flag !== '--status') &&
    (opts.list || flag !== '--list') &&
    (synopsis.includes('--quick') || (flag !== '--quick' && flag !== '--full'));
  const flags = commonFlags(script).filter(([flag]) => !describedHere(flag) && takes(flag));
  const pings = opts.failurePingsOnly
    ? `NOTIFY_URL (or NOTIFY_URL_VERDA, _MELLO for one script) receives one healthchecks.io ping,
URL/fail with the summary, when a run fails; nothing when it succeeds (a restore backs nothing up).`
    : `NOTIFY_URL (or NOTIFY_URL_VERDA, _MELLO, _CRON for one script) receives healthchecks.io pings:
URL/start when a run begins, URL with the summary when it succeeds, URL/fail when it fails.`;
  return `${usage}

${flags.length ? 'Flags:' : ''}
${flags.map(([, help]) => help).join('\n')}

Exit codes: 0 done, 1 a step failed (the others still ran), 2 usage or configuration error,
75 another run of this script holds the lock.

${pings}

${variablesHelp(script)}
`;
}

/** This machine's directories, by the variable that names each (loadConfig says): see errorText. */
let namedDirectories: [variable: string, dir: string][] = [];

export function nameDirectories(dirs: [variable: string, dir: string][]) {
  namedDirectories = dirs.map(([name, dir]) => [name, dir.replace(/(.)\/+$/, '$1')]);
}

/** What to do about an errno in a directory a variable names; VAR stands for the variable. */
const DIRECTORY_ADVICE: Record<string, string> = {
  // Read or write: the same advice either way.
  EACCES: "uid UID is not allowed there; run as the directory's owner, give it to uid UID, or set VAR to another",
  EPERM: "uid UID is not allowed there; run as the directory's owner, give it to uid UID, or set VAR to another",
  EROFS: 'a read-only file system; set VAR to a writable directory',
  ENOSPC: 'its disk is full; free space there or set VAR to a directory on a larger disk',
  EDQUOT: 'the disk quota is used up; free space there or set VAR to a directory with room',
};

/**
 * ` (BACKUP_DIR: its disk is full; ...)` when `file` lies in a directory a variable names (the
 * deepest: the state directory may lie in BACKUP_DIR), or is one mkdir could not make on the
 * way to it; else nothing.
 */
function directoryAdvice(err: NodeJS.ErrnoException): string {
  const advice = DIRECTORY_ADVICE[err.code!];
  const file = err.path!;
  if (!advice) return '';
  const inside = (dir: string) => file === dir || file.startsWith(dir === '/' ? dir : `${dir}/`);
  const above = (dir: string) => err.syscall === 'mkdir' && dir.startsWith(`${file}/`);
  const named = namedDirectories
    .filter(([, dir]) => inside(dir) || above(dir))
    .sort((a, b) => b[1].length - a[1].length)[0];
  if (!named) return '';
  const [name, dir] = named;
  const what = advice.replaceAll('VAR', name).replaceAll('UID', String(process.getuid?.() ?? '?'));
  return ` (${inside(dir) ? name : `${name} is ${dir}`}: ${what})`;
}

/**
 * An error as one line: the errno code and path, or the message. Never a stack. An EACCES,
 * ENOSPC and kin in a directory a variable names says which, and what to do.
 */
export function errorText(e: unknown): string {
  const err = e as NodeJS.ErrnoException & { cause?: NodeJS.ErrnoException };
  if (err?.code && err.path) return `${err.code}: ${err.path}${directoryAdvice(err)}`;
  // fetch's own message says nothing ("fetch failed"): its cause does (`ECONNREFUSED`).
  if (err?.cause && err.message === 'fetch failed') return err.cause.code ?? err.cause.message;
  return err?.message ?? String(e);
}

// What must never reach a terminal, a log, a file or a ping as it is: C0 controls (a newline that
// would forge a line, ESC that starts a terminal sequence), DEL, C1 controls (0x9b is a CSI on
// some terminals), and the Unicode characters that reorder or hide text (bidi overrides,
// zero-width characters, line and paragraph separators, the BOM).
const UNPRINTABLE = /[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u2069\ufeff]/g;

/**
 * Text as one printable line: every character above escaped (`\n`, `\u001b`). The one function
 * every name, key and word from Verda goes through before it is printed, written or pinged.
 */
export function printable(text: string): string {
  return text.replace(UNPRINTABLE, (c) => {
    const json = JSON.stringify(c).slice(1, -1);
    return json.length > 1 ? json : `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`;
  });
}

/** Sizes as `du -h` prints them, which is what the bash originals showed: 4.0K, 1.2M, 3.4G. */
export function humanSize(bytes: number): string {
  const units = ['B', 'K', 'M', 'G', 'T'];
  let v = bytes;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  if (i === 0) return `${bytes}B`;
  return `${v < 10 ? v.toFixed(1) : Math.round(v)}${units[i]}`;
}

function humanDuration(seconds: number): string {
  if (!Number.isFinite(seconds)) return '--:--';
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const pad = (n: number) => String(n).padStart(2, '0');
  return h ? `${h}:${pad(m)}:${pad(s % 60)}` : `${m}:${pad(s % 60)}`;
}

/** Where a transfer stands: the whole, and the file that moved last. */
interface TransferState {
  bytes: number;
  total: number;
  file?: { key: string; bytes: number; size: number };
  /** The total is still growing (the listing or the walk goes on): no percentage, no ETA. */
  counting?: boolean;
}

export interface Transfer {
  update(state: TransferState): void;
  /** Clears the progress line; the last state. */
  end(): TransferState;
}

/** Local time as the stamps read: `2026-01-02 14:03:05`. */
export function localTime(d: Date): string {
  const p = (n: number) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}

/**
 * One progress line: bytes of the total, rate, ETA and the file that moved last. Before the total
 * is known (Verda still listing what to send) it says so rather than "0B of 0B (100%)".
 */
export function transferLine(label: string, s: TransferState, seconds: number): string {
  const rate = seconds > 0 ? s.bytes / seconds : 0;
  const file = s.file ? `; ${printable(s.file.key)} ${humanSize(s.file.bytes)} of ${humanSize(s.file.size)}` : '';
  if (s.total <= 0) return `${label}: ${humanSize(s.bytes)} so far, ${humanSize(rate)}/s (total not known yet)${file}`;
  if (s.counting)
    return `${label}: ${humanSize(s.bytes)} of ${humanSize(s.total)} found so far, ${humanSize(rate)}/s${file}`;
  const eta = rate > 0 ? Math.max(0, s.total - s.bytes) / rate : Infinity;
  const pct = Math.min(100, Math.floor((s.bytes / s.total) * 100)); // a retried part counts twice
  return `${label}: ${humanSize(s.bytes)} of ${humanSize(s.total)} (${pct}%), ${humanSize(rate)}/s, ETA ${humanDuration(eta)}${file}`;
}

/**
 * Where the human lines go. With --json they go to stderr so stdout holds the JSON alone.
 * Colour and progress only on a terminal without NO_COLOR.
 */
export class Output {
  private readonly stream: NodeJS.WriteStream;
  readonly fancy: boolean;
  private progressShown = false;

  constructor(
    readonly json: boolean,
    readonly verbose: boolean,
    /** STATS_INTERVAL: how often a long transfer says where it stands when not on a terminal. */
    readonly statsIntervalMs = 60_000,
  ) {
    this.stream = json ? process.stderr : process.stdout;
    this.fancy = Boolean(this.stream.isTTY) && !process.env.NO_COLOR && process.env.TERM !== 'dumb';
  }

  private write(text: string, colour?: number) {
    this.clearProgress();
    const line = printable(text); // one line, whatever a message quoted from Verda held
    this.stream.write((this.fancy && colour ? `\x1b[${colour}m${line}\x1b[0m` : line) + '\n');
  }
  header(text: string) {
    this.write(text, 1);
  }
  step(n: number, text: string) {
    this.write(`Step ${n}: ${text}`, 1);
  }
  ok(text: string, bytes?: number) {
    this.write(`  ✓ ${text}${bytes === undefined ? '' : ` (${humanSize(bytes)})`}`, 32);
  }
  warn(text: string) {
    this.write(`  ⚠ ${text}`, 33);
  }
  fail(text: string) {
    this.write(`  ✗ ${text}`, 31);
  }
  info(text: string) {
    this.write(`  ${text}`);
  }
  detail(text: string) {
    if (this.verbose) this.write(`    ${text}`, 2);
  }
  plain(text: string) {
    this.write(text);
  }

  /**
   * A long transfer's progress: on a terminal a line redrawn as it goes (bytes, rate, ETA, and
   * the file that moved last); elsewhere (cron's log) a dated stats line every STATS_INTERVAL.
   */
  transfer(label: string): Transfer {
    const started = Date.now();
    let lastDraw = 0;
    let lastStats = started;
    let latest: TransferState = { bytes: 0, total: 0 };
    const line = (s: TransferState) => transferLine(label, s, (Date.now() - started) / 1000);
    return {
      update: (s) => {
        latest = s;
        const now = Date.now();
        if (this.fancy) {
          // Five redraws a second at most: it is called for every chunk.
          if (now - lastDraw < 200) return;
          lastDraw = now;
          this.stream.write(`\r\x1b[2K  ${line(s).slice(0, (this.stream.columns || 120) - 3)}`);
          this.progressShown = true;
        } else if (now - lastStats >= this.statsIntervalMs) {
          lastStats = now;
          this.write(`  [${localTime(new Date(now))}] ${line(s)}`);
        }
      },
      end: () => {
        this.clearProgress();
        return latest;
      },
    };
  }
  clearProgress() {
    if (this.progressShown) this.stream.write('\r\x1b[2K');
    this.progressShown = false;
  }
}
