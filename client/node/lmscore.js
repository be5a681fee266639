'use strict';
// A small Node.js client of lmscore.v1.Scorer. The service is built at runtime from the
// project's own .proto file, so this client and the server share one contract and no
// generated code can drift from it.

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'protos');
const PROTO_FILE = 'lmscore/v1/scoring.proto';

const LOADER_OPTIONS = {
  keepCase: true, // field names as in the .proto (item_index), as the Python client's to_dict()
  longs: Number,
  enums: String,
  defaults: true, // every result carries every field, even when it holds 0 / false / ""
  oneofs: true,
  includeDirs: [PROTO_ROOT],
};

// Token details with top-k can exceed gRPC's 4 MiB default; same limit as the Python client.
const CHANNEL_OPTIONS = { 'grpc.max_receive_message_length': 256 * 1024 * 1024 };

const MARGINAL_MODES = {
  same_pass: 'MARGINAL_MODE_SAME_PASS',
  separate_pass: 'MARGINAL_MODE_SEPARATE_PASS',
};

let scorerService; // loaded once, on first use

function loadService() {
  if (!scorerService) {
    const definition = protoLoader.loadSync(PROTO_FILE, LOADER_OPTIONS);
    scorerService = grpc.loadPackageDefinition(definition).lmscore.v1.Scorer;
  }
  return scorerService;
}

/** The status code's name (INVALID_ARGUMENT) for a grpc-js error, or UNKNOWN. */
function statusName(code) {
  return Object.keys(grpc.status).find((name) => grpc.status[name] === code) || 'UNKNOWN';
}

// A prompt or completion is text (string) or pre-tokenized ids (array of numbers).
function tokenInput(value, textKey, idsKey) {
  return Array.isArray(value) ? { [idsKey]: { ids: value } } : { [textKey]: value };
}

/** {prompt, completions} as the Python client's Item -> a ScoreItem message. */
function toScoreItem(item) {
  const message = {
    completions: item.completions.map((c) => tokenInput(c, 'text', 'token_ids')),
  };
  // null / undefined prompt: unset, the empty prompt.
  if (item.prompt !== null && item.prompt !== undefined) {
    Object.assign(message, tokenInput(item.prompt, 'prompt', 'prompt_token_ids'));
  }
  return message;
}

function toScoreOptions(options) {
  if (options.marginalMode && !(options.marginalMode in MARGINAL_MODES)) {
    throw new Error(`marginalMode must be same_pass or separate_pass, got ${options.marginalMode}`);
  }
  const message = {
    token_details: Boolean(options.tokenDetails),
    top_k: options.topK || 0,
    marginal_mode: MARGINAL_MODES[options.marginalMode || 'same_pass'],
    truncate_prompt_left: Boolean(options.truncatePromptLeft),
    pmi: Boolean(options.pmi),
    words: Boolean(options.words),
    prompt_words: Boolean(options.promptWords),
    entropy: Boolean(options.entropy),
    label_token_ids: options.labelTokenIds || [],
    label_tokens: options.labelTokens || [],
    distribution_positions: options.distributionPositions || [],
  };
  // `add_bos` is proto3 optional: leave it unset for the server's default.
  if (options.addBos !== undefined) message.add_bos = options.addBos;
  return message;
}

/** A ModelInfo message with `manifest_json` also given parsed, as `manifest`. */
function withManifest(info) {
  return { ...info, manifest: info.manifest_json ? JSON.parse(info.manifest_json) : {} };
}

// The proto3-optional fields of a result and of a token detail.
const OPTIONAL_RESULT_FIELDS = [
  'conditional_logprob_per_token',
  'conditional_logprob_per_char',
  'conditional_logprob_per_byte',
  'unconditional_logprob',
  'pmi',
];
const OPTIONAL_TOKEN_FIELDS = ['logprob', 'start', 'end', 'entropy'];
const OPTIONAL_WORD_FIELDS = ['logprob', 'logprob_uncorrected', 'entropy'];

// proto-loader marks a set proto3-optional field with a synthetic oneof key (_logprob) and
// gives an unset one its default (0); give unset ones as null, as the Python client's None.
function withNulls(message, names) {
  const clean = { ...message };
  for (const name of names) {
    clean[name] = message[`_${name}`] ? message[name] : null;
    delete clean[`_${name}`];
  }
  return clean;
}

// A token's `start` and `end` count Unicode code points of its segment's text (as Python
// str indices), not UTF-16 units: slice Array.from(text), not the string itself.
function cleanToken(token) {
  return withNulls(token, OPTIONAL_TOKEN_FIELDS);
}

// A word's `start` and `end` count code points too (of scored_completion, or of
// scored_prompt for prompt_words).
function cleanWord(word) {
  return withNulls(word, OPTIONAL_WORD_FIELDS);
}

// A whole distribution: its packed little-endian float32 bytes as a Float32Array (copied,
// so that it is aligned), one log-prob per token id.
function cleanDistribution({ position, logprobs }) {
  const bytes = Uint8Array.from(logprobs);
  return { position, logprobs: new Float32Array(bytes.buffer) };
}

class ScorerClient {
  /**
   * Connect to `address` (HOST:PORT, plaintext) and wait until the channel is ready.
   * `token` (default: $LMSCORE_TOKEN) is sent as `authorization: Bearer <token>`.
   */
  static async connect(address, { token = process.env.LMSCORE_TOKEN, timeoutMs = 10000 } = {}) {
    const Scorer = loadService();
    const client = new ScorerClient(
      new Scorer(address, grpc.credentials.createInsecure(), CHANNEL_OPTIONS),
      token,
      timeoutMs,
    );
    await new Promise((resolve, reject) => {
      client.stub.waitForReady(Date.now() + timeoutMs, (error) => {
        if (!error) return resolve();
        // Not a gRPC status of its own: report it as UNAVAILABLE, like a failed call.
        client.close();
        reject(Object.assign(error, { code: grpc.status.UNAVAILABLE, details: error.message }));
      });
    });
    return client;
  }

  constructor(stub, token, timeoutMs) {
    this.stub = stub;
    this.timeoutMs = timeoutMs;
    this.metadata = new grpc.Metadata();
    if (token) this.metadata.set('authorization', `Bearer ${token}`);
  }

  close() {
    this.stub.close();
  }

  callOptions(timeoutMs) {
    return { deadline: Date.now() + (timeoutMs || this.timeoutMs) };
  }

  /** A unary call of the stub, as a promise of its response. */
  unary(method, request, timeoutMs) {
    return new Promise((resolve, reject) => {
      this.stub[method](request, this.metadata, this.callOptions(timeoutMs), (error, response) =>
        error ? reject(error) : resolve(response),
      );
    });
  }

  /**
   * GetModelInfo of `model` (a served model's name; '' or unset: the server's first);
   * `manifest_json` is also given parsed, as `manifest`.
   */
  async modelInfo({ model = '', timeoutMs } = {}) {
    return withManifest(await this.unary('GetModelInfo', { model }, timeoutMs));
  }

  /** ListModels: every served model's ModelInfo (as modelInfo gives it), the default first. */
  async listModels({ timeoutMs } = {}) {
    const { models } = await this.unary('ListModels', {}, timeoutMs);
    return models.map(withManifest);
  }

  /**
   * Score `items` ([{prompt, completions}]) in one Score call. The server streams results
   * as they are computed; they are collected and returned in input order
   * (item_index, then completion_index).
   * options: {tokenDetails, topK, marginalMode: 'same_pass' | 'separate_pass',
   *           truncatePromptLeft, addBos, pmi, words, promptWords, entropy, labelTokenIds,
   *           labelTokens, distributionPositions, model, requestId, timeoutMs}
   * Distributions come as {position, logprobs: Float32Array} (one log-prob per token id).
   * Optional result fields the server leaves unset (pmi without the option, a normalized
   * score without a divisor) are null.
   */
  async score(items, options = {}) {
    const request = {
      model: options.model || '',
      items: items.map(toScoreItem),
      options: toScoreOptions(options),
      request_id: options.requestId || '',
    };
    return new Promise((resolve, reject) => {
      const results = [];
      const call = this.stub.Score(request, this.metadata, this.callOptions(options.timeoutMs));
      call.on('data', ({ tokens, ...result }) => {
        results.push({
          ...withNulls(result, OPTIONAL_RESULT_FIELDS),
          tokens: tokens.map(cleanToken),
          words: (result.words || []).map(cleanWord),
          prompt_words: (result.prompt_words || []).map(cleanWord),
          label_logprobs: result.label_logprobs || [],
          distributions: (result.distributions || []).map(cleanDistribution),
        });
      });
      // A failed call emits 'error' before any 'end'; the promise keeps the first outcome.
      call.on('error', reject);
      call.on('end', () => {
        results.sort(
          (a, b) => a.item_index - b.item_index || a.completion_index - b.completion_index,
        );
        resolve(results);
      });
    });
  }
}

module.exports = { ScorerClient, statusName, PROTO_ROOT, PROTO_FILE };
