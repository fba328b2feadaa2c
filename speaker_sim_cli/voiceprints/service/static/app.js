// The voiceprint login page: record with getUserMedia + an AudioWorklet, resample to 16 kHz
// with an OfflineAudioContext (band-limited, not sample dropping), encode a 16-bit WAV, send it.
"use strict";

const RATE = 16000;
const $ = (id) => document.getElementById(id);

function status(text, error) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

async function recordPcm(seconds) {
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false,
             autoGainControl: false },
  });
  const ctx = new AudioContext();
  try {
    await ctx.audioWorklet.addModule("/static/recorder-worklet.js");
    const source = ctx.createMediaStreamSource(stream);
    const node = new AudioWorkletNode(ctx, "recorder");
    const blocks = [];
    let have = 0;
    const want = Math.round(seconds * ctx.sampleRate);
    await new Promise((resolve) => {
      node.port.onmessage = (e) => {
        if (have >= want) return;
        blocks.push(e.data);
        have += e.data.length;
        if (have >= want) resolve();
      };
      source.connect(node);
    });
    node.port.postMessage("stop");
    source.disconnect();
    const pcm = new Float32Array(want);
    let at = 0;
    for (const b of blocks) {
      const n = Math.min(b.length, want - at);
      pcm.set(b.subarray(0, n), at);
      at += n;
      if (at >= want) break;
    }
    return { pcm, rate: ctx.sampleRate };
  } finally {
    stream.getTracks().forEach((t) => t.stop());
    await ctx.close();
  }
}

async function resample(pcm, rate) {
  if (rate === RATE) return pcm;
  const frames = Math.ceil((pcm.length * RATE) / rate);
  const off = new OfflineAudioContext(1, frames, RATE);
  const buf = off.createBuffer(1, pcm.length, rate);
  buf.copyToChannel(pcm, 0);
  const src = off.createBufferSource();
  src.buffer = buf;
  src.connect(off.destination);
  src.start();
  const out = await off.startRendering();
  return out.getChannelData(0);
}

function wav16(samples, rate) {
  const view = new DataView(new ArrayBuffer(44 + samples.length * 2));
  const text = (o, s) => { for (let i = 0; i < s.length; i++) view.setUint8(o + i, s.charCodeAt(i)); };
  text(0, "RIFF"); view.setUint32(4, 36 + samples.length * 2, true); text(8, "WAVE");
  text(12, "fmt "); view.setUint32(16, 16, true); view.setUint16(20, 1, true);
  view.setUint16(22, 1, true); view.setUint32(24, rate, true); view.setUint32(28, rate * 2, true);
  view.setUint16(32, 2, true); view.setUint16(34, 16, true);
  text(36, "data"); view.setUint32(40, samples.length * 2, true);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    view.setInt16(44 + i * 2, s < 0 ? s * 0x8000 : s * 0x7fff, true);
  }
  return new Blob([view.buffer], { type: "audio/wav" });
}

async function recordWav() {
  const seconds = Math.min(30, Math.max(1, Number($("seconds").value) || 3));
  status(`Recording ${seconds} s...`);
  const { pcm, rate } = await recordPcm(seconds);
  status("Sending...");
  return wav16(await resample(pcm, rate), RATE);
}

async function send(url, wav) {
  const headers = { "Content-Type": "audio/wav" };
  const key = $("key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  const r = await fetch(url, { method: "POST", headers, body: wav });
  let body;
  try { body = await r.json(); } catch { body = { error: { code: "internal", message: r.statusText } }; }
  if (!r.ok) throw new Error(`${body.error.code}: ${body.error.message}`);
  return body;
}

function busy(on) {
  $("enrol").disabled = on;
  $("identify").disabled = on;
}

async function enrol() {
  const name = $("name").value.trim();
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/.test(name)) {
    status("Enter a name: letters, digits, '.', '_' or '-'.", true);
    return;
  }
  busy(true);
  try {
    const r = await send(`/v1/speakers/${encodeURIComponent(name)}/enrol`, await recordWav());
    const have = r.speech_seconds || 0;
    $("progress").value = Math.min(1, have / r.required_seconds);
    $("progress-text").textContent = r.complete
      ? `${have.toFixed(1)} s of speech: enrolment complete`
      : `${have.toFixed(1)} of ${r.required_seconds} s of speech: record ${r.remaining_seconds.toFixed(1)} s more`;
    status(r.complete ? `Enrolled ${r.speaker}.` : `Enrolled part of ${r.speaker}'s voiceprint.`);
    $("result").textContent = JSON.stringify(r, null, 2);
  } catch (e) {
    status(String(e.message || e), true);
  } finally {
    busy(false);
  }
}

async function identify() {
  busy(true);
  try {
    const r = await send("/v1/identify", await recordWav());
    const who = r.speaker === "unknown" ? "an unknown speaker" : r.speaker;
    status(`Identified: ${who} (score ${r.score === null ? "n/a" : r.score.toFixed(3)}, threshold ${r.threshold})`);
    $("result").textContent = JSON.stringify(r, null, 2);
    document.body.dataset.identified = r.speaker;
  } catch (e) {
    status(String(e.message || e), true);
  } finally {
    busy(false);
  }
}

window.addEventListener("DOMContentLoaded", () => {
  $("enrol").addEventListener("click", enrol);
  $("identify").addEventListener("click", identify);
});
