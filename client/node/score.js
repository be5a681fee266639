#!/usr/bin/env node
'use strict';
// Score prompt/completion pairs on an lmscore server and print one JSON document:
//   {"server", "model", "items", "results"}  ("model": the served model's name)
// results are in input order, with the .proto's field names (joint_logprob, ...).
// Errors go to stderr as "<STATUS_CODE_NAME>: <details>" with a non-zero exit status.

const { ScorerClient, statusName } = require('./lmscore');

const USAGE = `usage: node score.js [--server HOST:PORT] [--model NAME]
                     [--prompt TEXT --completion TEXT...]...
                     [--token-details] [--top-k K] [--timeout SECONDS]
                     [--marginal-mode same_pass|separate_pass] [--pmi]
                     [--words] [--prompt-words] [--entropy]
                     [--label-token TEXT]... [--label-token-id ID]...
                     [--distribution-position P]...

  --model picks one of the models the server serves (default: its first).
  --pmi also scores each completion after the empty context (results' pmi).
  --words / --prompt-words: per-word log-probs, beginning-of-word corrected
  (results' words / prompt_words).
  --entropy: each token's and word's next-token entropy in nats (with
  --token-details or --words).
  --label-token / --label-token-id: candidate labels (one token each), read in
  one pass after each completion (results' label_logprobs, in order).
  --distribution-position: whole distributions at positions of the joint
  sequence, -1 after its last token (results' distributions, log-prob arrays).

  --prompt starts an item; each --completion after it is one of its completions
  (a --completion before any --prompt scores against the empty prompt).
  Without --prompt/--completion: a demo pair and a demo multiple-choice item.
  A bearer token is read from $LMSCORE_TOKEN.`;

// One pair, and one multiple-choice item: the completion with the highest
// conditional_logprob is the model's answer.
const DEMO_ITEMS = [
  { prompt: 'The capital of France is', completions: [' Paris'] },
  {
    prompt: 'Question: Which planet is known as the Red Planet?\nAnswer:',
    completions: [' Mars', ' Venus', ' Jupiter', ' Saturn'],
  },
];

class UsageError extends Error {}

// A hand-written loop rather than util.parseArgs: the order of --prompt and --completion
// matters, and a value may start with "-" (--top-k -1).
function parseArgs(argv) {
  const args = { server: '127.0.0.1:50051', items: [], options: {}, timeoutMs: 60000 };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new UsageError(`${flag} needs a value`);
      return argv[++i];
    };
    const number = () => {
      const text = value();
      const parsed = Number(text);
      if (text.trim() === '' || !Number.isFinite(parsed)) {
        throw new UsageError(`${flag} needs a number, got ${JSON.stringify(text)}`);
      }
      return parsed;
    };
    switch (flag) {
      case '--server':
        args.server = value();
        break;
      case '--model':
        args.options.model = value();
        break;
      case '--prompt':
        args.items.push({ prompt: value(), completions: [] });
        break;
      case '--completion':
        if (args.items.length === 0) args.items.push({ prompt: null, completions: [] });
        args.items[args.items.length - 1].completions.push(value());
        break;
      case '--token-details':
        args.options.tokenDetails = true;
        break;
      case '--top-k': // top-k alternatives come with the token details
        args.options.topK = number();
        args.options.tokenDetails = true;
        break;
      case '--marginal-mode':
        args.options.marginalMode = value();
        break;
      case '--pmi':
        args.options.pmi = true;
        break;
      case '--words':
        args.options.words = true;
        break;
      case '--prompt-words':
        args.options.promptWords = true;
        break;
      case '--entropy':
        args.options.entropy = true;
        break;
      case '--label-token':
        (args.options.labelTokens ||= []).push(value());
        break;
      case '--label-token-id':
        (args.options.labelTokenIds ||= []).push(number());
        break;
      case '--distribution-position':
        (args.options.distributionPositions ||= []).push(number());
        break;
      case '--timeout':
        args.timeoutMs = number() * 1000;
        break;
      case '-h':
      case '--help':
        process.stdout.write(`${USAGE}\n`);
        process.exit(0);
        break;
      default:
        throw new UsageError(`unknown argument ${JSON.stringify(flag)}`);
    }
  }
  // An item without completions is left for the server to reject (INVALID_ARGUMENT).
  if (args.items.length === 0) args.items = DEMO_ITEMS;
  return args;
}

async function main() {
  let args;
  try {
    args = parseArgs(process.argv.slice(2));
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    process.stderr.write(`${error.message}\n${USAGE}\n`);
    return 2;
  }
  let client;
  try {
    client = await ScorerClient.connect(args.server, { timeoutMs: args.timeoutMs });
    const info = await client.modelInfo({ model: args.options.model });
    const results = (await client.score(args.items, args.options)).map((result) => ({
      ...result,
      distributions: result.distributions.map(({ position, logprobs }) => ({
        position,
        logprobs: Array.from(logprobs),
      })),
    }));
    process.stdout.write(
      `${JSON.stringify({ server: args.server, model: info.name, items: args.items, results }, null, 2)}\n`,
    );
    return 0;
  } catch (error) {
    if (error.code === undefined) throw error; // not a gRPC failure: a bug, keep its stack
    process.stderr.write(`${statusName(error.code)}: ${error.details}\n`);
    return 1;
  } finally {
    if (client) client.close();
  }
}

main().then(
  (status) => {
    process.exitCode = status;
  },
  (error) => {
    process.stderr.write(`${error.stack}\n`);
    process.exitCode = 1;
  },
);
