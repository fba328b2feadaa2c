// AudioWorklet processor: hands the microphone's PCM (Float32, channel 0) to the page in
// blocks, at the AudioContext's own rate. Resampling happens in the page (OfflineAudioContext).
class Recorder extends AudioWorkletProcessor {
  constructor() {
    super();
    this.recording = true;
    this.port.onmessage = (e) => { if (e.data === "stop") this.recording = false; };
  }
  process(inputs) {
    const ch = inputs[0] && inputs[0][0];
    if (ch && this.recording) this.port.postMessage(ch.slice(0));
    return this.recording;
  }
}
registerProcessor("recorder", Recorder);
