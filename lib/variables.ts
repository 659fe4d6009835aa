// The one table of the scripts' variables: name, default, meaning, which scripts read it, whether
// it is a secret. lib/config.ts takes its defaults from here (and reads no name that is not a
// row: VariableName is the type of its reads); `--help`, docs/configuration.md and .env.example
// are made from it (`npm run docs`; test/variables.test.ts fails when they drift). A module of
// data and text only: `--help` loads it without anything else.

export const SCRIPTS = ['backup-verda', 'backup-mello', 'backup-cron', 'restore-verda', 'restore-mello'] as const;
type Script = (typeof SCRIPTS)[number];

const ALL = SCRIPTS;
const R2_SCRIPTS = ['backup-verda', 'backup-mello', 'restore-verda', 'restore-mello'] as const;
const VERDA_SSH = ['backup-verda', 'restore-verda'] as const;
const VERDA_BUCKETS = ['backup-verda', 'restore-verda'] as const;
const MELLO_FILES = ['backup-mello', 'restore-mello'] as const;

const GROUPS = {
  r2: 'R2: endpoint, buckets and keys',
  hosts: 'Machines and SSH',
  mello: 'Paths on Mello (and the state directory of each machine)',
  verda: 'Verda: paths and commands',
  keep: 'Rotation, versions, drill, progress',
  age: 'Encryption of secrets sent to R2',
  notify: 'Notifications and --status',
  limits: 'Timeouts and retries',
  system: "The system's own",
} as const;

export interface Variable {
  name: string;
  group: keyof typeof GROUPS;
  /** The value taken when the variable is unset or empty, exactly as it would be written in `.env`. */
  default?: string;
  /** What happens when it is unset, when that is not a value: another variable, or "versions off". */
  unset?: string;
  meaning: string;
  scripts: readonly Script[];
  /** Never printed, never on a command line, never sent to Verda (but the models pair, to Verda only). */
  secret?: boolean;
  /** Must be set for some work: `.env.example` has it uncommented. */
  required?: boolean;
  /** Read from the process's environment only: in `.env` it does nothing. */
  environmentOnly?: boolean;
}

const R2_EU = 'https://<account>.eu.r2.cloudflarestorage.com';

export const VARIABLES = [
  // R2
  {
    name: 'R2_ENDPOINT',
    group: 'r2',
    unset: 'required for R2 steps',
    meaning:
      "S3 endpoint of the R2 account, `https://<account>.r2.cloudflarestorage.com` (no bucket in it): every bucket's unless it has its own",
    scripts: R2_SCRIPTS,
    required: true,
  },
  {
    name: 'R2_ACCESS_KEY_ID',
    group: 'r2',
    unset: 'AWS_ACCESS_KEY_ID',
    meaning: 'the shared key pair: used for each bucket that has no pair of its own',
    scripts: R2_SCRIPTS,
    secret: true,
    required: true,
  },
  {
    name: 'R2_SECRET_ACCESS_KEY',
    group: 'r2',
    unset: 'AWS_SECRET_ACCESS_KEY',
    meaning: 'the shared key pair: used for each bucket that has no pair of its own',
    scripts: R2_SCRIPTS,
    secret: true,
    required: true,
  },
  {
    name: 'AWS_ACCESS_KEY_ID',
    group: 'r2',
    meaning: 'the name aws-cli reads, taken when R2_ACCESS_KEY_ID is unset',
    scripts: R2_SCRIPTS,
    secret: true,
  },
  {
    name: 'AWS_SECRET_ACCESS_KEY',
    group: 'r2',
    meaning: 'the name aws-cli reads, taken when R2_SECRET_ACCESS_KEY is unset',
    scripts: R2_SCRIPTS,
    secret: true,
  },
  {
    name: 'R2_MODELS_BUCKET',
    group: 'r2',
    default: 'comfy-multi-model-vault-backup',
    meaning: 'the models bucket: every `*.safetensors` under VERDA_MODELS_DIR, keyed by its relative path',
    scripts: VERDA_BUCKETS,
  },
  {
    name: 'R2_MODELS_ENDPOINT',
    group: 'r2',
    unset: 'R2_ENDPOINT',
    meaning: "the models bucket's endpoint",
    scripts: VERDA_BUCKETS,
  },
  {
    name: 'R2_MODELS_ACCESS_KEY_ID',
    group: 'r2',
    unset: 'R2_ACCESS_KEY_ID',
    meaning:
      "the models bucket's own key pair (set both or neither): the R2 key Verda receives (without it, Verda gets the shared pair)",
    scripts: VERDA_BUCKETS,
    secret: true,
  },
  {
    name: 'R2_MODELS_SECRET_ACCESS_KEY',
    group: 'r2',
    unset: 'R2_SECRET_ACCESS_KEY',
    meaning: "the models bucket's own key pair (set both or neither)",
    scripts: VERDA_BUCKETS,
    secret: true,
  },
  {
    name: 'R2_CACHE_BUCKET',
    group: 'r2',
    default: 'comfy-multi-cache',
    meaning: 'the cache bucket: the worker image and the config bundle with its dated copies',
    scripts: VERDA_BUCKETS,
  },
  {
    name: 'R2_CACHE_ENDPOINT',
    group: 'r2',
    unset: 'R2_ENDPOINT',
    meaning: "the cache bucket's endpoint",
    scripts: VERDA_BUCKETS,
  },
  {
    name: 'R2_CACHE_ACCESS_KEY_ID',
    group: 'r2',
    unset: 'R2_ACCESS_KEY_ID',
    meaning: "the cache bucket's own key pair (set both or neither)",
    scripts: VERDA_BUCKETS,
    secret: true,
  },
  {
    name: 'R2_CACHE_SECRET_ACCESS_KEY',
    group: 'r2',
    unset: 'R2_SECRET_ACCESS_KEY',
    meaning: "the cache bucket's own key pair (set both or neither)",
    scripts: VERDA_BUCKETS,
    secret: true,
  },
  {
    name: 'R2_USER_FILES_BUCKET',
    group: 'r2',
    default: 'comfy-multi-user-files',
    meaning: "the user-files bucket: MELLO_DATA_DIR's `user_data/`, `outputs/` and `inputs/` under the same keys",
    scripts: MELLO_FILES,
  },
  {
    name: 'R2_USER_FILES_ENDPOINT',
    group: 'r2',
    unset: 'R2_ENDPOINT',
    meaning: `the user-files bucket's endpoint: it lives in the EU jurisdiction, \`${R2_EU}\``,
    scripts: MELLO_FILES,
  },
  {
    name: 'R2_USER_FILES_ACCESS_KEY_ID',
    group: 'r2',
    unset: 'R2_ACCESS_KEY_ID',
    meaning:
      "the user-files bucket's own key pair (set both or neither); with R2_VERSIONS_BUCKET it also signs the copies into that bucket, so it must be allowed on both",
    scripts: MELLO_FILES,
    secret: true,
  },
  {
    name: 'R2_USER_FILES_SECRET_ACCESS_KEY',
    group: 'r2',
    unset: 'R2_SECRET_ACCESS_KEY',
    meaning: "the user-files bucket's own key pair (set both or neither)",
    scripts: MELLO_FILES,
    secret: true,
  },
  {
    name: 'R2_VERSIONS_BUCKET',
    group: 'r2',
    unset: 'versions off',
    meaning:
      "where backup-mello keeps a user's file it is about to replace, as `T/KEY` (a server-side copy); in the user-files bucket's jurisdiction",
    scripts: MELLO_FILES,
  },
  {
    name: 'R2_VERSIONS_ENDPOINT',
    group: 'r2',
    unset: 'R2_USER_FILES_ENDPOINT, else R2_ENDPOINT',
    meaning: "the versions bucket's endpoint (its keys are the user-files bucket's)",
    scripts: MELLO_FILES,
  },

  // Machines
  {
    name: 'VERDA_HOST',
    group: 'hosts',
    default: 'dev@verda',
    meaning: 'how Mello reaches Verda: an SSH destination `[user@]host` or `ssh://[user@]host[:port]`, or `local`',
    scripts: VERDA_SSH,
  },
  {
    name: 'MELLO_HOST',
    group: 'hosts',
    default: 'dev@mello',
    meaning: 'how Verda reaches Mello to trigger backup-mello: an SSH destination, or `local`',
    scripts: ['backup-cron'],
  },
  {
    name: 'SSH_CONFIG',
    group: 'hosts',
    unset: "ssh's own",
    meaning: 'an ssh_config file passed to ssh as `-F` (absolute path)',
    scripts: ['backup-verda', 'backup-cron', 'restore-verda'],
  },

  // Mello
  {
    name: 'BACKUP_DIR',
    group: 'mello',
    default: '~/backups/verda',
    meaning: "on Mello: Verda's config archives, manifests and worker image",
    scripts: VERDA_SSH,
  },
  {
    name: 'MELLO_DATA_DIR',
    group: 'mello',
    default: '~/projects/comfyui/data',
    meaning: "on Mello: the users' files, `user_data/`, `outputs/`, `inputs/`",
    scripts: MELLO_FILES,
  },
  {
    name: 'MELLO_SCRIPTS_DIR',
    group: 'mello',
    default: '~/projects/comfymulti-scripts',
    meaning: "where backup-cron runs backup-mello.mts on Mello (`~` is Mello's home, expanded there)",
    scripts: ['backup-cron'],
  },
  {
    name: 'COMFYMULTI_STATE_DIR',
    group: 'mello',
    default: '~/.cache/comfymulti-scripts',
    meaning:
      'on the machine the script runs on: locks, hash caches, last-run records (default under XDG_CACHE_HOME when that is set)',
    scripts: ALL,
  },

  // Verda
  {
    name: 'VERDA_SYSROOT',
    group: 'verda',
    default: '/',
    meaning: 'prefix of the system paths read and restored on Verda (`/etc`, `/var/lib`, `/lib`)',
    scripts: ['backup-verda', 'backup-cron', 'restore-verda'],
  },
  {
    name: 'VERDA_SUDO',
    group: 'verda',
    default: 'sudo -n',
    meaning: 'how root-only paths are read on Verda; empty (`VERDA_SUDO=`): no sudo',
    scripts: ['backup-verda', 'backup-cron', 'restore-verda'],
  },
  {
    name: 'VERDA_HOME',
    group: 'verda',
    default: '/home/dev',
    meaning: "the Verda user's home (home-dev and oh-my-zsh archives)",
    scripts: VERDA_SSH,
  },
  {
    name: 'VERDA_PROJECT_DIR',
    group: 'verda',
    default: '/home/dev/comfy-multi',
    meaning: 'the comfy-multi project on Verda, and its `.env`',
    scripts: ['backup-verda', 'backup-cron', 'restore-verda'],
  },
  {
    name: 'VERDA_MODELS_DIR',
    group: 'verda',
    default: '/mnt/sfs/models',
    meaning: 'the models on Verda (on SFS): every `*.safetensors` under it goes to the models bucket',
    scripts: VERDA_SSH,
  },
  {
    name: 'SFS_BACKUP_DIR',
    group: 'verda',
    default: '/mnt/sfs/cache/backups',
    meaning: "on Verda's SFS: backup-cron's hourly copies, the image's cache copy, the models' hash cache",
    scripts: ['backup-verda', 'backup-cron', 'restore-verda'],
  },
  {
    name: 'SFS_MOUNT',
    group: 'verda',
    default: '/mnt/sfs',
    meaning:
      'must be a mount point on Verda for every step whose path lies under it (never moved by VERDA_SYSROOT); empty (`SFS_MOUNT=`): no check',
    scripts: ['backup-verda', 'backup-cron', 'restore-verda'],
  },
  {
    name: 'CONTAINER_CLI',
    group: 'verda',
    default: 'docker',
    meaning: '`docker` or `podman`, on Verda',
    scripts: VERDA_SSH,
  },
  {
    name: 'CONTAINER_IMAGE',
    group: 'verda',
    default: 'comfy-multi-worker-1',
    meaning: 'the worker image (a reference or an image ID)',
    scripts: VERDA_SSH,
  },
  {
    name: 'VERDA_SYSTEMCTL',
    group: 'verda',
    default: 'systemctl',
    meaning: 'how restore-verda stops, starts and reloads services on Verda',
    scripts: ['restore-verda'],
  },

  // Rotation, versions, drill, progress
  {
    name: 'KEEP_BACKUPS',
    group: 'keep',
    default: '10',
    meaning:
      'whole restore points kept in BACKUP_DIR (and the newest whole one with the worker image); SFS copies and R2 dated bundles: this many per kind',
    scripts: ['backup-verda', 'backup-cron'],
  },
  {
    name: 'KEEP_VERSIONS_DAYS',
    group: 'keep',
    default: '30',
    meaning: 'days the replaced versions in R2_VERSIONS_BUCKET are kept',
    scripts: ['backup-mello'], // its retention step; restore-mello reads what is there
  },
  {
    name: 'DRILL_MAX_BYTES',
    group: 'keep',
    default: '4294967296',
    meaning:
      "bytes a drill may handle on Mello in all (4 GiB): restore-verda's unpacks up to it; restore-mello's reads every object back within it, else a random sample of that many bytes",
    scripts: ['restore-verda', 'restore-mello'],
  },
  {
    name: 'STATS_INTERVAL',
    group: 'keep',
    default: '60',
    meaning: 'seconds between the stats lines of a long step when stdout is not a terminal (a cron log)',
    scripts: R2_SCRIPTS,
  },

  // Encryption
  {
    name: 'AGE_RECIPIENTS',
    group: 'age',
    unset: 'not encrypted',
    meaning:
      'age public keys (`age1...`, comma or space separated) or the absolute path of a file of them: the secret artifacts sent to R2 are encrypted to them',
    scripts: ['backup-verda'],
  },
  {
    name: 'AGE_IDENTITY_FILE',
    group: 'age',
    unset: 'none',
    meaning:
      'the age identity file (absolute path) that decrypts them: restore, the drill and `--verify --deep` need it on Mello',
    scripts: VERDA_SSH,
  },

  // Notifications and status
  {
    name: 'NOTIFY_URL',
    group: 'notify',
    unset: 'no pings',
    meaning:
      'ping URL in the healthchecks.io convention: `URL/start`, `URL` with the summary, `URL/fail` (the URL is the key: never printed)',
    scripts: ALL,
    secret: true,
  },
  {
    name: 'NOTIFY_URL_VERDA',
    group: 'notify',
    unset: 'NOTIFY_URL',
    meaning: "backup-verda's and restore-verda's own ping URL",
    scripts: VERDA_SSH,
    secret: true,
  },
  {
    name: 'NOTIFY_URL_MELLO',
    group: 'notify',
    unset: 'NOTIFY_URL',
    meaning: "backup-mello's and restore-mello's own ping URL",
    scripts: MELLO_FILES,
    secret: true,
  },
  {
    name: 'NOTIFY_URL_CRON',
    group: 'notify',
    unset: 'NOTIFY_URL',
    meaning: "backup-cron's own ping URL",
    scripts: ['backup-cron'],
    secret: true,
  },
  {
    name: 'STALE_HOURS',
    group: 'notify',
    default: '26',
    meaning: '`--status` flags a newest backup older than this many hours',
    scripts: ['backup-verda', 'backup-mello', 'backup-cron'],
  },

  // Limits: production values by default; the tests set them to seconds.
  {
    name: 'COMFYMULTI_R2_TIMEOUT',
    group: 'limits',
    default: '60',
    meaning: 'seconds an R2 request may go with no byte moving either way before it is abandoned (and retried)',
    scripts: R2_SCRIPTS,
  },
  {
    name: 'COMFYMULTI_R2_ATTEMPTS',
    group: 'limits',
    default: '5',
    meaning: 'attempts per R2 request, the first included (1 to 100)',
    scripts: R2_SCRIPTS,
  },
  {
    name: 'COMFYMULTI_R2_BACKOFF',
    group: 'limits',
    default: '0.5',
    meaning: 'seconds before the first retry of an R2 request; doubled per attempt, with jitter',
    scripts: R2_SCRIPTS,
  },
  {
    name: 'COMFYMULTI_SSH_TIMEOUT',
    group: 'limits',
    default: '10',
    meaning: "seconds: ssh's connect timeout, and how soon a dead link is noticed (three keepalives)",
    scripts: ['backup-verda', 'backup-cron', 'restore-verda'],
  },
  {
    name: 'COMFYMULTI_COMMAND_TIMEOUT',
    group: 'limits',
    default: '600',
    meaning: 'seconds a command (on Verda, or local) may print nothing before it is stopped',
    scripts: ['backup-verda', 'backup-cron', 'restore-verda'],
  },
  {
    name: 'COMFYMULTI_NOTIFY_TIMEOUT',
    group: 'limits',
    default: '3',
    meaning: 'seconds per notification request; the end of a run waits for its pings at most twice this',
    scripts: ALL,
  },

  // The system's
  {
    name: 'HOME',
    group: 'system',
    unset: "the user's home",
    meaning: 'what `~` in a default or a path value stands for',
    scripts: ALL,
  },
  {
    name: 'XDG_CACHE_HOME',
    group: 'system',
    unset: '~/.cache',
    meaning: "COMFYMULTI_STATE_DIR's default is under it when it is an absolute path",
    scripts: ALL,
  },
  {
    name: 'NO_COLOR',
    group: 'system',
    unset: 'colour on a terminal',
    meaning: 'set (to anything): no colour and no progress line, even on a terminal; read from the environment only',
    scripts: ALL,
    environmentOnly: true,
  },
] as const satisfies readonly Variable[];

export type VariableName = (typeof VARIABLES)[number]['name'];

const BY_NAME: ReadonlyMap<string, Variable> = new Map(VARIABLES.map((v) => [v.name, v]));

function variable(name: string): Variable | undefined {
  return BY_NAME.get(name);
}

/** The value a variable takes when unset; '' for a variable whose default is not a value. */
export function defaultOf(name: VariableName): string {
  return (BY_NAME.get(name) as Variable).default ?? '';
}

/** The variables a script reads, in the table's order. */
export function variablesOf(script: string): Variable[] {
  return VARIABLES.filter((v) => (v.scripts as readonly string[]).includes(script));
}

/** The default as a line of help shows it: the value, or "(…)" when it is not one. */
function helpDefault(v: Variable): string {
  if (v.default !== undefined) return v.default;
  return `(${v.unset ?? 'none'})`;
}

/** `--help`'s "Variables" section for one script (the system's own, HOME and kin, left to the docs). */
export function variablesHelp(script: string): string {
  const rows = variablesOf(script).filter((v) => v.group !== 'system');
  const width = Math.max(...rows.map((v) => v.name.length)) + 2;
  return [
    'Variables, each with its default ("(...)" when that is not a value). The environment wins over',
    '.env; docs/configuration.md explains each, .env.example lists them:',
    ...rows.map((v) => `  ${v.name.padEnd(width)}${helpDefault(v)}${v.secret ? '  [secret]' : ''}`),
  ].join('\n');
}

// -------------------------------------------------------------------------------------------
// Unknown variables in .env

/** Optimal string alignment distance: insertions, deletions, substitutions, adjacent swaps. */
export function editDistance(a: string, b: string): number {
  const d: number[][] = Array.from({ length: a.length + 1 }, (_, i) => [i, ...Array<number>(b.length).fill(0)]);
  for (let j = 1; j <= b.length; j++) d[0][j] = j;
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      d[i][j] = Math.min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) {
        d[i][j] = Math.min(d[i][j], d[i - 2][j - 2] + 1);
      }
    }
  }
  return d[a.length][b.length];
}

/**
 * The known variable nearest to `name` (case aside), or undefined when none is near enough to be
 * a slip of the fingers: at most a third of the name's letters apart (2 for a short name).
 */
export function nearestVariable(name: string): string | undefined {
  const upper = name.toUpperCase();
  let best: { name: string; distance: number } | undefined;
  for (const v of VARIABLES) {
    const distance = editDistance(upper, v.name);
    if (!best || distance < best.distance) best = { name: v.name, distance };
  }
  const allowed = Math.max(2, Math.floor(name.length / 3));
  return best && best.distance <= allowed ? best.name : undefined;
}

/**
 * What is wrong with a name set in `.env` (`where` is `file:line`), or undefined for a variable
 * the scripts read from there.
 */
export function dotenvNameWarning(name: string, where: string): string | undefined {
  if (name in RETIRED) return `${where}: ${name} is no longer read (ignored): ${RETIRED[name]}`;
  const known = variable(name);
  if (known?.environmentOnly) return `${where}: ${name} is read from the environment only: in .env it does nothing`;
  if (known) return undefined;
  const near = nearestVariable(name);
  const hint = near ? `did you mean ${near}?` : 'docs/configuration.md lists them';
  return `${where}: ${name} is not a variable of these scripts (ignored); ${hint}`;
}

// -------------------------------------------------------------------------------------------
// docs/configuration.md and .env.example

/** Names the scripts once read, and why they no longer do: a `.env` still setting one is told so. */
export const RETIRED: Record<string, string> = {
  VERDA_SCRIPTS_DIR:
    "nothing is installed on Verda any more: Verda's side of the models steps is brought over the run's SSH connection",
};

/** An `unset` that names the variables taken instead (`R2_ENDPOINT`, `A, else B`). */
const OTHER_VARIABLES = /^[A-Z][A-Z0-9_]*(, else [A-Z][A-Z0-9_]*)?$/;

const GENERATED = 'Generated from lib/variables.ts by `npm run docs`: edit the table there, not this file.';

function readBy(v: Variable): string {
  return v.scripts.length === SCRIPTS.length ? 'all' : v.scripts.join(', ');
}

function mdDefault(v: Variable): string {
  if (v.default !== undefined) return `\`${v.default}\``;
  if (!v.unset) return '—';
  // A default that is another variable reads as that variable.
  return OTHER_VARIABLES.test(v.unset) ? v.unset.replace(/[A-Z][A-Z0-9_]*/g, '`$&`') : `— (${v.unset})`;
}

const cell = (text: string) => text.replace(/\|/g, '\\|');

/** docs/configuration.md: the configuration reference. */
export function configurationMarkdown(): string {
  const lines = [
    '# Configuration',
    '',
    `<!-- ${GENERATED} -->`,
    '',
    'Each script reads its variables from the environment, then from `.env` beside the scripts (or the',
    'file given with `--env-file PATH`); the environment wins. Start from `.env.example`, which lists',
    'every variable below with its default:',
    '',
    '```sh',
    'cp .env.example .env && chmod 600 .env   # .env holds secrets; git ignores it',
    '```',
    '',
    'An `.env` is read as the shell reads simple assignments: `KEY=value`, `export KEY=value`,',
    '`KEY="a b"  # note` (quotes and the comment are taken off), `KEY=\'literal\'`. Every value is checked',
    'before anything is done: a problem is exit 2 naming the variable (or the file and line). A name in',
    '`.env` that is not below is a warning naming the nearest one (`VERDA_HOTS`: "did you mean',
    'VERDA_HOST?"); names in the environment are not checked. Path variables must be absolute (`~/`',
    'is the home of the user running the script). `--help` of each script lists the variables it reads.',
    '',
    'A variable whose default is another variable takes that one\'s value when unset. "Secret" values',
    'are never printed nor put on a command line. Of the R2 keys only the pair the models bucket uses',
    'ever reaches Verda: its own (`R2_MODELS_*`), else the shared one, so give the models bucket its own.',
  ];
  for (const [group, title] of Object.entries(GROUPS)) {
    const rows = VARIABLES.filter((v) => v.group === group);
    lines.push('', `## ${title}`, '', '| variable | default | meaning | read by |', '|---|---|---|---|');
    for (const v of rows as readonly Variable[]) {
      const meaning = `${v.meaning}${v.secret ? ' **Secret.**' : ''}`;
      lines.push(`| \`${v.name}\` | ${cell(mdDefault(v))} | ${cell(meaning)} | ${readBy(v)} |`);
    }
  }
  return lines.join('\n') + '\n';
}

/** .env.example: every variable a `.env` may set, each with its default. */
export function envExample(): string {
  const lines = [
    '# comfymulti-scripts: copy to .env beside the scripts (cp .env.example .env && chmod 600 .env),',
    '# or pass another file with --env-file PATH. The environment wins over this file. A line left',
    '# commented out keeps the default it shows; docs/configuration.md explains each variable.',
    `# ${GENERATED}`,
  ];
  for (const [group, title] of Object.entries(GROUPS)) {
    // The system's own (HOME, XDG_CACHE_HOME, NO_COLOR) are the environment's business.
    if (group === 'system') continue;
    const rows = (VARIABLES as readonly Variable[]).filter((v) => v.group === group);
    lines.push('', `# ---- ${title}`);
    for (const v of rows) {
      const unset = !v.unset || v.default !== undefined ? '' : v.required ? v.unset : `unset: ${v.unset}`;
      const notes = [
        OTHER_VARIABLES.test(v.unset ?? '') ? `default: ${v.unset}` : unset,
        v.secret ? 'secret' : '',
        `read by ${readBy(v)}`,
      ].filter(Boolean);
      lines.push('', ...wrapComment(`${v.meaning} (${notes.join('; ')})`));
      lines.push(v.required ? `${v.name}=` : `# ${v.name}=${v.default ?? ''}`);
    }
  }
  return lines.join('\n') + '\n';
}

/** A comment of at most 100 columns a line, a sentence without the markdown backticks. */
function wrapComment(text: string): string[] {
  const plain = text.replace(/`/g, '');
  const words = (plain[0].toUpperCase() + plain.slice(1)).split(' ');
  const lines: string[] = [];
  let line = '#';
  for (const w of words) {
    if (line.length + 1 + w.length > 100 && line !== '#') {
      lines.push(line);
      line = '#';
    }
    line += ` ${w}`;
  }
  lines.push(line);
  return lines;
}
