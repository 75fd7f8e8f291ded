/* edge-web: polls /api/site every second and draws one card per line.
 * Everything that came over MQTT is written with textContent (never as HTML). */
(function () {
  'use strict';

  var REFRESH_MS = Number(document.body.dataset.refreshMs) || 1000;
  var DASH = '–';
  var COLORS = {
    p50: '#2563eb', p99: '#ea580c', reads: '#0d9488', autosort: '#7c3aed',
    window: '#2563eb', reference: '#64748b', training: '#cbd5e1', grid: '#eef2f6'
  };
  var minutes = Number(document.body.dataset.defaultMinutes) || 30;
  var cards = new Map();   // line id -> {card, tile, charts: {name: Chart}, readsKey}
  var started = performance.now();

  // What the browser test (and anyone curious) can read: how many charts exist and have drawn.
  var dashboard = window.dashboard = {
    ready: false, readyMs: null, updates: 0, failures: 0, charts: 0, chartsDrawn: 0, lines: 0
  };

  Chart.defaults.animation = false;
  Chart.defaults.font.size = 11;
  Chart.defaults.color = '#475569';
  Chart.defaults.plugins.legend.labels.boxWidth = 10;
  Chart.defaults.plugins.legend.labels.boxHeight = 10;
  Chart.register({ id: 'drawnCounter', afterDraw: function (chart) { chart.$draws = (chart.$draws || 0) + 1; } });

  // -- formatting ------------------------------------------------------------------------------
  function num(v) { return typeof v === 'number' && isFinite(v) ? v : null; }
  function fmt(v, digits, unit) {
    v = num(v);
    if (v === null) return DASH;
    return v.toLocaleString(undefined, { minimumFractionDigits: digits, maximumFractionDigits: digits }) + (unit || '');
  }
  function fmtMs(v) {
    v = num(v);
    if (v === null) return DASH;
    return (v >= 100 ? v.toFixed(0) : v.toFixed(1)) + ' ms';
  }
  function clock(epochS) {
    if (num(epochS) === null) return DASH;
    return new Date(epochS * 1000).toLocaleTimeString([], { hour12: false });
  }
  function age(seconds) {
    seconds = num(seconds);
    if (seconds === null) return DASH;
    if (seconds < 90) return seconds.toFixed(seconds < 10 ? 1 : 0) + ' s ago';
    if (seconds < 5400) return Math.round(seconds / 60) + ' min ago';
    return (seconds / 3600).toFixed(1) + ' h ago';
  }
  function since(epochS, nowS) {
    if (num(epochS) === null) return DASH;
    var s = Math.max(0, nowS - epochS);
    if (s < 120) return clock(epochS) + ' (' + Math.round(s) + ' s)';
    if (s < 7200) return clock(epochS) + ' (' + Math.round(s / 60) + ' min)';
    return clock(epochS) + ' (' + (s / 3600).toFixed(1) + ' h)';
  }
  function pick(obj, path) {
    return path.split('.').reduce(function (o, k) { return o && typeof o === 'object' ? o[k] : undefined; }, obj);
  }

  // -- DOM helpers -----------------------------------------------------------------------------
  function el(tag, text, cls) {
    var node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }
  function field(root, key) { return root.querySelector('[data-k="' + key + '"]'); }
  function setText(root, key, text, tone) {
    var node = field(root, key);
    if (!node) return;
    if (node.textContent !== text) node.textContent = text;
    if (tone) node.dataset.tone = tone; else delete node.dataset.tone;
  }
  function rows(table, pairs) {
    var body = document.createDocumentFragment();
    pairs.forEach(function (pair) {
      var tr = el('tr');
      pair.forEach(function (cell) { tr.appendChild(el('td', cell)); });
      body.appendChild(tr);
    });
    table.replaceChildren(body);
  }

  // -- charts ----------------------------------------------------------------------------------
  function timeScale() {
    return {
      type: 'linear',
      ticks: { maxTicksLimit: 5, callback: function (v) {
        // Seconds matter on a short range, only minutes on a long one.
        var short = this.max - this.min < 600;
        return new Date(v * 1000).toLocaleTimeString([], short ? { hour12: false } : { hour: '2-digit', minute: '2-digit', hour12: false });
      } },
      grid: { color: COLORS.grid }
    };
  }
  function lineDataset(label, color, extra) {
    return Object.assign({ label: label, data: [], borderColor: color, backgroundColor: color, borderWidth: 1.6,
      pointRadius: 0, tension: 0.25, spanGaps: true }, extra || {});
  }
  function makeCharts(card) {
    var charts = {};
    var common = { responsive: true, maintainAspectRatio: false, parsing: false, normalized: true,
      interaction: { mode: 'nearest', intersect: false },
      plugins: { legend: { position: 'bottom' }, tooltip: { enabled: true } } };
    charts.latency = new Chart(card.querySelector('[data-chart="latency"]'), {
      type: 'line',
      data: { datasets: [lineDataset('p50', COLORS.p50), lineDataset('p99', COLORS.p99)] },
      options: Object.assign({}, common, { scales: { x: timeScale(), y: { beginAtZero: true, grid: { color: COLORS.grid } } } })
    });
    charts.throughput = new Chart(card.querySelector('[data-chart="throughput"]'), {
      type: 'line',
      data: { datasets: [lineDataset('reads/min', COLORS.reads, { fill: false }),
                         lineDataset('auto-sort %', COLORS.autosort, { yAxisID: 'pct', borderDash: [4, 3] })] },
      options: Object.assign({}, common, { scales: {
        x: timeScale(),
        y: { beginAtZero: true, grid: { color: COLORS.grid } },
        pct: { position: 'right', min: 0, max: 100, grid: { drawOnChartArea: false }, ticks: { callback: function (v) { return v + '%'; } } }
      } })
    });
    var digitLabels = ['0', '1', '2', '3', '4', '5', '6', '7', '8', '9'];
    charts.digits = new Chart(card.querySelector('[data-chart="digits"]'), {
      type: 'bar',
      data: { labels: digitLabels, datasets: [
        { label: 'window', data: [], backgroundColor: COLORS.window },
        { label: 'site reference', data: [], backgroundColor: COLORS.reference },
        { label: 'training', data: [], backgroundColor: COLORS.training }] },
      options: { responsive: true, maintainAspectRatio: false, plugins: { legend: { position: 'bottom' } },
        scales: { x: { grid: { display: false } }, y: { beginAtZero: true, grid: { color: COLORS.grid }, ticks: { callback: function (v) { return v + '%'; } } } } }
    });
    charts.confidence = new Chart(card.querySelector('[data-chart="confidence"]'), {
      type: 'bar',
      data: { labels: [], datasets: [
        { label: 'window', data: [], backgroundColor: COLORS.reads, categoryPercentage: 1.0, barPercentage: 0.95 },
        { label: 'training', data: [], backgroundColor: COLORS.training, categoryPercentage: 1.0, barPercentage: 0.95 }] },
      options: { responsive: true, maintainAspectRatio: false, plugins: { legend: { position: 'bottom' } },
        scales: { x: { grid: { display: false }, ticks: { maxTicksLimit: 6 } },
                  y: { type: 'logarithmic', min: 0.01, max: 100, grid: { color: COLORS.grid },
                       ticks: { callback: function (v) { var l = Math.log10(v); return Math.abs(l - Math.round(l)) < 1e-6 ? +v.toPrecision(1) + '%' : ''; } } } } }
    });
    return charts;
  }

  function shares(values) {
    if (!Array.isArray(values)) return [];
    var total = values.reduce(function (a, v) { return a + (num(v) || 0); }, 0);
    return total > 0 ? values.map(function (v) { return +(100 * (num(v) || 0) / total).toFixed(2); }) : [];
  }
  function points(series, key) {
    var at = series.at || [], ys = series[key] || [];
    var out = new Array(at.length);
    for (var i = 0; i < at.length; i++) out[i] = { x: at[i], y: num(ys[i]) };
    return out;
  }
  function updateCharts(charts, line, nowS) {
    var series = line.series || {};
    // The axis spans the chosen range, or what has been collected so far when that is shorter.
    var at = series.at || [];
    var xMin = Math.max(nowS - minutes * 60, at.length > 1 ? at[0] : nowS - 60);
    [charts.latency, charts.throughput].forEach(function (chart) {
      chart.options.scales.x.min = xMin;
      chart.options.scales.x.max = nowS;
    });
    charts.latency.data.datasets[0].data = points(series, 'p50_ms');
    charts.latency.data.datasets[1].data = points(series, 'p99_ms');
    charts.throughput.data.datasets[0].data = points(series, 'reads_per_min');
    charts.throughput.data.datasets[1].data = points(series, 'auto_sort_pct');

    var obs = line.observability || {};
    charts.digits.data.datasets[0].data = shares(pick(obs, 'window.digit_distribution'));
    charts.digits.data.datasets[1].data = shares(pick(obs, 'reference.digit_distribution'));
    charts.digits.data.datasets[2].data = shares(pick(obs, 'training.digit_distribution'));

    var hist = pick(obs, 'window.confidence_histogram') || {};
    var counts = hist.counts || [];
    var edges = hist.edges || counts.map(function (_c, i) { return i / counts.length; });
    charts.confidence.data.labels = counts.map(function (_c, i) { return num(edges[i]) === null ? '' : edges[i].toFixed(2); });
    // A log axis cannot show zero: empty bins stay empty rather than drawn at a fake floor.
    charts.confidence.data.datasets[0].data = shares(counts).map(function (v) { return v > 0 ? v : null; });
    charts.confidence.data.datasets[1].data = shares(pick(obs, 'training.confidence_histogram.counts')).map(function (v) { return v > 0 ? v : null; });
    Object.keys(charts).forEach(function (name) { charts[name].update('none'); });
  }

  // -- one line --------------------------------------------------------------------------------
  function addLine(line) {
    var tile = document.getElementById('tpl-tile').content.firstElementChild.cloneNode(true);
    var card = document.getElementById('tpl-line').content.firstElementChild.cloneNode(true);
    var anchor = 'line-' + line.line;
    card.id = anchor;
    tile.href = '#' + anchor;
    insertSorted(document.getElementById('overview'), tile, line.line);
    insertSorted(document.getElementById('lines'), card, line.line);
    var entry = { card: card, tile: tile, charts: makeCharts(card), readsKey: null, errorsKey: null, eventsKey: null };
    cards.set(line.line, entry);
    dashboard.charts += 4;
    return entry;
  }
  function insertSorted(parent, node, key) {
    node.dataset.line = key;
    var after = Array.prototype.find.call(parent.children, function (c) { return c.dataset.line && c.dataset.line > key; });
    parent.insertBefore(node, after || null);
  }

  function tone(status) { return status === 'up' ? 'ok' : status === 'down' ? 'bad' : 'idle'; }

  function renderLine(entry, line, nowS) {
    var card = entry.card, tile = entry.tile;
    var status = line.status || 'unknown';
    var rates = line.rates || {}, latency = line.latency_ms || {};
    card.dataset.status = status;
    tile.dataset.status = status;
    [card, tile].forEach(function (root) {
      var badge = field(root, 'status');
      badge.dataset.status = status;
      setText(root, 'status', status === 'up' ? 'up' : status === 'down' ? 'down' : 'unknown');
      setText(root, 'line', line.line);
      setText(root, 'reads_per_min', fmt(rates.reads_per_min, 1));
      setText(root, 'auto_sort_pct', fmt(rates.auto_sort_pct, 1, ' %'));
      setText(root, 'p99', fmtMs(latency.p99));
    });
    setText(card, 'status_reason', line.status_reason || '');
    setText(tile, 'tile_reason', status === 'up' ? '' : (line.status_reason || ''));
    setText(card, 'since', since(pick(line, 'agent.since'), nowS));
    setText(card, 'health_age', age(line.health_age_s));
    var link = field(card, 'metrics_link');
    if (line.metrics_url) { link.href = line.metrics_url; link.hidden = false; } else { link.removeAttribute('href'); link.hidden = true; }

    setText(card, 'review_pct', fmt(rates.review_pct, 1, ' %'));
    setText(card, 'p50', fmtMs(latency.p50));
    var pending = num(pick(line, 'outbox.pending'));
    setText(card, 'outbox', fmt(pending, 0), pending === null ? null : pending > 100 ? 'warn' : null);
    var camera = line.camera || {};
    setText(card, 'camera', camera.state || DASH, camera.state ? (camera.state === 'ok' ? 'ok' : 'bad') : null);
    setText(card, 'camera_sub', camera.state ? fmt(camera.fps, 1, ' fps') + (camera.last_error ? ' · ' + camera.last_error : '') : '');
    var mqtt = line.mqtt || {};
    var connected = mqtt.connected;
    setText(card, 'agent_mqtt', connected === true ? 'connected' : connected === false ? 'lost' : DASH,
      connected === true ? 'ok' : connected === false ? 'bad' : null);
    setText(card, 'agent_mqtt_sub', mqtt.protocol ? 'MQTT ' + mqtt.protocol : '');

    renderDrift(card, tile, line);
    renderModel(card, tile, line);
    renderSyncEvents(entry, Array.isArray(line.sync_events) ? line.sync_events : []);
    renderReasons(field(card, 'review_reasons'), rates.review_pct_by_reason || {});
    renderStages(field(card, 'stages'), line.stages_ms || {});
    renderModelHealth(field(card, 'model_health'), line);
    renderSystem(field(card, 'system'), line.system || {}, line.counters || {});
    renderReads(entry, line.reads || []);
    renderErrors(entry, line.errors || []);
    updateCharts(entry.charts, line, nowS);
  }

  function renderDrift(card, tile, line) {
    var drift = line.drift || {};
    var box = field(card, 'drift');
    var alarms = Array.isArray(drift.alarms) ? drift.alarms : [];
    if (drift.state === 'alarm' || alarms.length) {
      box.dataset.tone = 'bad';
      var list = el('ul');
      alarms.forEach(function (a) {
        var text = a.message || ((a.kind || 'drift') + ': ' + (a.figure || '') + ' ' + fmt(a.value, 3) + ' (level ' + fmt(a.level, 2) + ')');
        list.appendChild(el('li', text));
      });
      box.replaceChildren(el('strong', 'Drift alarm'), list);
      setText(tile, 'drift_short', '⚠ drift alarm', 'bad');
    } else if (drift.judged === false) {
      box.dataset.tone = 'idle';
      box.replaceChildren(el('span', 'Drift not judged yet: too few reads in the window or the site reference is still filling.'));
      setText(tile, 'drift_short', 'drift: not judged yet', 'idle');
    } else if (drift.state === 'ok') {
      box.dataset.tone = 'ok';
      box.replaceChildren(el('span', '✓ No drift: predictions, confidence and input match the site reference.'));
      setText(tile, 'drift_short', '✓ no drift', null);
    } else {
      box.dataset.tone = 'idle';
      box.replaceChildren(el('span', 'Drift: not reported by this agent.'));
      setText(tile, 'drift_short', 'drift: not reported', 'idle');
    }
  }

  // -- model and sync ------------------------------------------------------------------------------
  // adopted: the shipped bundle installed as the line's first model (edge-sync adopt).
  var OUTCOMES = { updated: 'updated', up_to_date: 'up to date', adopted: 'adopted', refused: 'refused', rolled_back: 'rolled back' };
  var OUTCOME_TONES = { updated: 'ok', up_to_date: 'ok', adopted: 'ok', refused: 'bad', rolled_back: 'bad' };
  function words(name) { return String(name || '').replace(/_/g, ' '); }
  function outcomeText(result) {
    var text = OUTCOMES[result.outcome] || words(result.outcome);
    // "up to date" names the version the line already runs; the others the version they acted on.
    return result.version && result.outcome !== 'up_to_date' ? text + ' ' + result.version : text;
  }

  function renderModel(card, tile, line) {
    var model = line.model || {}, sync = line.sync || {};
    var version = line.model_version || DASH;
    var canary = model.canary === true;
    card.dataset.canary = tile.dataset.canary = String(canary);
    setText(card, 'model_version', version, model.mismatch ? 'warn' : null);
    setText(tile, 'tile_version', line.model_version || '');
    setText(card, 'model_previous', model.previous ? '(previous ' + model.previous + ')' : '');
    [card, tile].forEach(function (root) {
      var badge = field(root, 'canary');
      badge.hidden = !canary;
      badge.title = model.canary_reason || '';
    });
    var channel = model.pin ? 'pinned ' + model.pin : model.channel ? 'channel ' + model.channel : '';
    setText(card, 'channel', channel ? '· ' + channel : '');

    var result = sync.last_result;
    if (!sync.heard) {
      setText(card, 'last_sync', 'not reported', 'idle');
      setText(card, 'last_sync_age', '');
    } else if (!result) {
      setText(card, 'last_sync', 'no result yet', 'idle');
      setText(card, 'last_sync_age', age(sync.age_s));
    } else {
      setText(card, 'last_sync', outcomeText(result), OUTCOME_TONES[result.outcome] || null);
      setText(card, 'last_sync_age', age(num(result.age_s) === null ? sync.age_s : result.age_s));
    }
    var reason = (result && result.reason) || sync.last_error || '';
    setText(card, 'last_sync_reason', reason ? '· ' + reason : '');
    field(card, 'last_sync_reason').title = reason;

    // What an operator must act on: the agent not on the active version, a refused or rolled-back pull.
    var alerts = [];
    if (model.mismatch) alerts.push(['Model mismatch: ', model.mismatch_reason || ('agent runs ' + model.running + ', sync activated ' + model.active)]);
    var problem = sync.problem;
    if (problem) alerts.push(['Last sync ' + outcomeText(problem) + ': ', problem.reason || '']);
    var box = field(card, 'sync_alert');
    box.hidden = !alerts.length;
    box.replaceChildren.apply(box, alerts.map(function (a) {
      var row = el('div');
      row.append(el('strong', a[0]), document.createTextNode(a[1]));
      return row;
    }));
    var short = model.mismatch ? '⚠ model mismatch' : problem ? '⚠ sync ' + (OUTCOMES[problem.outcome] || words(problem.outcome)) : '';
    setText(tile, 'sync_short', short);
  }

  function describeEvent(e) {
    var name = e.source === 'agent' ? 'agent switched' : words(e.event);
    var text = name;
    if (e.source === 'agent' || e.event === 'rolled_back') text += ' ' + (e.from || e.version || '?') + ' → ' + (e.to || '?');
    else if (e.version) text += ' ' + e.version;
    if (e.event === 'activated' && e.from) text += ' (from ' + e.from + ')';
    if (e.event === 'check' && e.channel) text += ' · channel ' + e.channel;
    if (e.reason) text += ': ' + e.reason;
    return text;
  }
  var EVENT_TONES = { refused: 'bad', rolled_back: 'bad', rollback_failed: 'bad', health_unknown: 'bad',
    activated: 'ok', adopted: 'ok', healthy: 'ok' };
  function renderSyncEvents(entry, events) {
    var key = events.length ? events[0].at + ':' + events[0].event + ':' + events.length : '';
    if (key === entry.eventsKey) return;
    entry.eventsKey = key;
    var box = field(entry.card, 'sync_events');
    if (!events.length) { box.replaceChildren(el('div', 'no sync steps heard yet', 'none')); return; }
    box.replaceChildren.apply(box, events.slice(0, 6).map(function (e) {
      var row = el('div');
      var text = el('span', describeEvent(e));
      if (EVENT_TONES[e.event]) text.dataset.tone = EVENT_TONES[e.event];
      row.title = text.textContent;
      row.append(el('time', clock(e.at)), text);
      return row;
    }));
  }

  function renderReasons(box, byReason) {
    var names = Object.keys(byReason).filter(function (k) { return num(byReason[k]) !== null; });
    names.sort(function (a, b) { return byReason[b] - byReason[a]; });
    if (!names.length) { box.replaceChildren(el('div', 'no reviews in the last minute', 'none')); return; }
    var frag = document.createDocumentFragment();
    names.slice(0, 8).forEach(function (name) {
      var row = el('div', null, 'bar-row');
      var track = el('div', null, 'bar-track');
      var fill = el('div', null, 'bar-fill');
      fill.style.width = Math.min(100, byReason[name]) + '%';
      track.appendChild(fill);
      row.append(el('span', name.replace(/_/g, ' ')), track, el('span', fmt(byReason[name], 1, ' %')));
      frag.appendChild(row);
    });
    box.replaceChildren(frag);
  }

  var STAGE_NAMES = { wait_frame: 'wait for frame', locate: 'locate digits', classify: 'classify', decide: 'decide',
    store: 'store', publish_ack: 'publish → ack', trigger_to_result: 'trigger → result' };
  function renderStages(table, stages) {
    var pairs = Object.keys(STAGE_NAMES).filter(function (k) { return stages[k]; }).map(function (k) {
      return [STAGE_NAMES[k], fmt(stages[k].p50, 1) + ' / ' + fmt(stages[k].p99, 1)];
    });
    rows(table, pairs.length ? pairs : [['stages', DASH]]);
  }

  var DRIFT_FIGURES = { prediction_psi: 'prediction PSI', confidence_psi: 'confidence PSI',
    sharpness_ratio: 'sharpness ratio', inverted_share_change: 'inverted share Δ',
    digit_height_px: 'digit height (px)' };
  function renderModelHealth(table, line) {
    var obs = line.observability || {};
    var w = obs.window || {}, q = w.input_quality || {}, ref = obs.reference || {};
    var figures = pick(obs, 'drift.figures') || {}, levels = pick(obs, 'drift.levels') || {};
    var pairs = [
      ['reads in window', fmt(w.reads, 0)],
      ['review rate', num(w.review_rate) === null ? DASH : fmt(100 * w.review_rate, 1, ' %')],
      ['digits per frame', fmt(w.digits_per_frame_mean, 2)],
      ['site reference', num(ref.reads) === null ? DASH : fmt(ref.reads, 0) + ' reads' + (ref.complete === false ? ' (filling)' : '')]
    ];
    Object.keys(DRIFT_FIGURES).forEach(function (k) {
      if (!(k in figures) && !(k in levels)) return;
      var decimals = k === 'digit_height_px' ? 0 : 3;  // pixels, not a ratio
      pairs.push([DRIFT_FIGURES[k], fmt(figures[k], decimals) + (num(levels[k]) === null ? '' : ' / ' + fmt(levels[k], Math.min(decimals, 2)))]);
    });
    var bar = line.chute_threshold || {};
    if (num(bar.threshold) !== null) {  // only with a sort plan: the chute posterior an item needs now
      var how = bar.acceptance !== 'spent' ? ' · per item'
        : num(bar.reads) !== null && bar.reads < bar.min_reads ? ' · strict until ' + fmt(bar.min_reads, 0) + ' reads (' + fmt(bar.reads, 0) + ')'
        : ' · spent over ' + fmt(bar.reads, 0) + ' reads';
      pairs.push(['chute bar', fmt(bar.threshold, 4) + how]);
    }
    pairs.push(['brightness · contrast', fmt(q.brightness, 0) + ' · ' + fmt(q.contrast, 0)]);
    pairs.push(['sharpness', fmt(q.sharpness, 0)]);
    pairs.push(['inverted frames', num(q.inverted_share) === null ? DASH : fmt(100 * q.inverted_share, 1, ' %')]);
    rows(table, pairs);
  }

  function renderSystem(table, system, counters) {
    rows(table, [
      ['CPU', fmt(system.cpu_pct, 0, ' %')],
      // Percent of one core: readers near 100 % leave the line no headroom for a busier hour.
      ['agent · readers (of a core)', fmt(system.agent_cpu_pct, 0, ' %') + ' · ' + fmt(system.reader_cpu_pct, 0, ' %')],
      ['agent memory', fmt(system.mem_rss_mb, 0, ' MB')],
      ['disk free', fmt(system.disk_free_pct, 0, ' %')],
      ['temperature', fmt(system.temperature_c, 0, ' °C')],
      ['reads / errors', fmt(counters.reads, 0) + ' / ' + fmt(counters.read_errors, 0)]
    ]);
  }

  function renderReads(entry, reads) {
    var key = reads.length ? reads[0].result_id + ':' + reads.length : '';
    if (key === entry.readsKey) return;
    entry.readsKey = key;
    var body = field(entry.card, 'reads');
    var frag = document.createDocumentFragment();
    reads.slice(0, 6).forEach(function (r) {
      var tr = el('tr');
      tr.appendChild(el('td', clock(r.decided_at)));
      tr.appendChild(el('td', r.item_id || DASH));
      tr.appendChild(el('td', r.postcode || DASH, 'postcode'));
      var decision = el('td');
      var tag = el('span', r.accepted ? 'SORT' : 'REVIEW' + (r.reason ? ' · ' + r.reason.replace(/_/g, ' ') : ''), 'decision');
      tag.dataset.tone = r.accepted ? 'ok' : 'warn';
      decision.appendChild(tag);
      tr.appendChild(decision);
      tr.appendChild(el('td', fmt(r.confidence, 3)));
      tr.appendChild(el('td', fmt(r.latency_ms, 1)));
      var crops = el('td');
      if (r.crops_png) {
        var img = el('img');
        img.alt = 'digit crops of ' + (r.postcode || 'the read');
        img.addEventListener('error', function () { this.replaceWith(document.createTextNode(DASH)); });
        img.src = 'data:image/png;base64,' + r.crops_png;  // validated base64 from the server
        crops.appendChild(img);
      } else {
        crops.textContent = DASH;
      }
      tr.appendChild(crops);
      frag.appendChild(tr);
    });
    if (!reads.length) {
      var empty = el('tr');
      var td = el('td', 'no reads yet', 'none');
      td.colSpan = 7;
      empty.appendChild(td);
      frag.appendChild(empty);
    }
    body.replaceChildren(frag);
  }

  function renderErrors(entry, errors) {
    var key = errors.length ? errors[0].at + ':' + errors.length : '';
    if (key === entry.errorsKey) return;
    entry.errorsKey = key;
    var box = field(entry.card, 'errors');
    box.replaceChildren.apply(box, errors.slice(0, 3).map(function (e) {
      return el('div', clock(e.at) + '  ' + (e.kind || 'error') + ': ' + (e.error || ''));
    }));
  }

  // -- the whole site --------------------------------------------------------------------------
  function renderSite(snap) {
    var nowS = num(snap.generated_at) || Date.now() / 1000;
    var broker = snap.broker || {};
    var summary = snap.summary || {};
    var brokerOk = broker.state === 'connected';
    var pill = document.getElementById('broker-pill');
    pill.dataset.tone = brokerOk ? 'ok' : broker.state === 'connecting' ? 'idle' : 'bad';
    document.getElementById('broker-text').textContent = 'Broker ' + (broker.address || '') + ': ' + (broker.state || DASH);
    var banner = document.getElementById('broker-banner');
    banner.hidden = brokerOk || broker.state === 'connecting';
    document.getElementById('broker-banner-text').textContent = 'Since ' + clock(broker.since) + (broker.error ? ' (' + broker.error + ').' : '.');

    var lines = Array.isArray(snap.lines) ? snap.lines : [];
    var up = summary.up || 0, down = summary.down || 0;
    var linesPill = document.getElementById('lines-pill');
    linesPill.dataset.tone = !lines.length ? 'idle' : down ? 'bad' : up === lines.length ? 'ok' : 'idle';
    document.getElementById('lines-text').textContent = 'Lines up ' + up + ' / ' + lines.length + (down ? ' · ' + down + ' down' : '');
    var alarms = summary.drift_alarms || 0;
    var driftPill = document.getElementById('drift-pill');
    driftPill.dataset.tone = alarms ? 'warn' : lines.length ? 'ok' : 'idle';
    document.getElementById('drift-text').textContent = alarms ? 'Drift alarms: ' + alarms : 'No drift alarms';
    document.getElementById('empty').hidden = lines.length > 0;
    renderModelsPill(summary, lines.length);

    var seen = new Set();
    lines.forEach(function (line) {
      if (typeof line.line !== 'string') return;
      seen.add(line.line);
      var entry = cards.get(line.line) || addLine(line);
      renderLine(entry, line, nowS);
    });
    cards.forEach(function (entry, id) {
      if (seen.has(id)) return;
      Object.keys(entry.charts).forEach(function (k) { entry.charts[k].destroy(); });
      entry.card.remove();
      entry.tile.remove();
      cards.delete(id);
      dashboard.charts -= 4;
    });
    document.getElementById('updated').textContent = 'updated ' + clock(nowS);
    dashboard.lines = cards.size;
    dashboard.updates += 1;
    dashboard.chartsDrawn = countDrawn();
    if (!dashboard.ready && cards.size && dashboard.chartsDrawn === dashboard.charts) {
      dashboard.ready = true;
      dashboard.readyMs = Math.round(performance.now());
      dashboard.sinceScriptMs = Math.round(performance.now() - started);
    }
  }

  function renderModelsPill(summary, lineCount) {
    var versions = summary.model_versions || {};
    var names = Object.keys(versions);
    var trouble = (summary.model_mismatches || 0) + (summary.sync_problems || 0);
    var text = names.length ? 'Models ' + names.map(function (v) {
      return names.length > 1 ? v + ' ×' + versions[v] : v;
    }).join(' · ') : 'Models: ' + DASH;
    if (summary.model_mismatches) text += ' · ' + summary.model_mismatches + ' mismatch';
    if (summary.sync_problems) text += ' · ' + summary.sync_problems + ' sync refused/rolled back';
    var pill = document.getElementById('models-pill');
    pill.dataset.tone = trouble ? 'warn' : names.length ? 'ok' : 'idle';
    document.getElementById('models-text').textContent = lineCount ? text : 'Models: ' + DASH;
  }

  function countDrawn() {
    var n = 0;
    cards.forEach(function (entry) {
      Object.keys(entry.charts).forEach(function (k) {
        var c = entry.charts[k];
        if (c.$draws > 0 && c.canvas && c.canvas.width > 0 && c.canvas.height > 0) n += 1;
      });
    });
    return n;
  }

  var timer = null;
  function poll() {
    clearTimeout(timer);
    fetch('/api/site?minutes=' + minutes, { cache: 'no-store', headers: { Accept: 'application/json' } })
      .then(function (res) {
        return res.json().catch(function () { return {}; }).then(function (body) {
          if (!res.ok) throw new Error(body.error || ('HTTP ' + res.status));
          return body;
        });
      })
      .then(function (snap) {
        document.getElementById('server-banner').hidden = true;
        renderSite(snap);
      })
      .catch(function (err) {
        dashboard.failures += 1;
        document.getElementById('server-banner').hidden = false;
        document.getElementById('server-banner-text').textContent = String(err && err.message || err) +
          '. Values below are frozen; retrying every ' + (REFRESH_MS / 1000) + ' s.';
      })
      .finally(function () { timer = setTimeout(poll, REFRESH_MS); });
  }

  document.getElementById('range').addEventListener('change', function (ev) {
    var value = Number(ev.target.value);
    if (value >= 1 && value <= 240) { minutes = value; poll(); }
  });
  var select = document.getElementById('range');
  select.value = String(minutes);
  poll();
}());
