"""SpeechLLM: speech encoder(s) -> projector(s) -> chat prompt with spliced speech -> causal LLM.

Module names follow zhu-han/SpeechLLM (``Speech_LLM_Zipformer`` / ``Speech_LLM_Zipformer_MoSE``) so
its checkpoints load unchanged:

- ``encoder``: the speech encoder, or an ``nn.ModuleList`` of them for MoSE (``encoders`` gives a
  list in both cases);
- ``encoder_projector``: :class:`~llmasr.projector.Projector` (keys ``encoder_projector.proj.1.*``),
  or an ``nn.ModuleList`` for MoSE (``encoder_projector.<k>.proj.*``);
- ``llm``: the (peft-wrapped) causal LM (``llm.base_model.model.model.layers...lora_A.default.weight``);
- ``prompt_embedding``: ``Embedding(4, H)``, only in SpeechLLM's layout (prompt format
  "speechllm") or with ``use_prompt_embedding=True``; other recipes' models (icefall
  whisper_llm_zh, FireRedASR-LLM) have no such table, so their checkpoints lack the key. SpeechLLM
  meant its rows to replace the embeddings of ``<start_text>``, ``<end_text>``, ``<start_speech>``,
  ``<end_speech>``, but its write goes to a copy, so the table never changes an output. We keep it
  (trainable, saved, averaged - checkpoints keep their keys) and, like the original, ignore it unless
  ``use_prompt_embedding=True`` (then the rows really replace those token embeddings; for new models,
  e.g. LLMs without spare vocab rows).

Speech splicing: the k-th ``<speech>`` of a prompt is replaced by the first ``encoder_out_lens // ds``
projected frames of the k-th encoder (MoSE training: a random subset of encoders, in random order,
for prompts whose groups were dropped). Merged rows are left-padded with zero vectors (mask False);
no padded speech frame reaches the LLM, so a row's result does not depend on its batch.

``compat_reference_padding=True`` reproduces recipes whose results do depend on the batch (icefall
whisper_llm_zh; README.md says what it means for each system): encoders with a ``mask_padding``
attribute (Whisper) attend to the batch padding, and every row gets all ``T // ds`` projected frames
of the padded batch, the frames computed from padding included. Decode prompts are then rows of
equal length (no padding, all-ones mask, positions 0..L-1: what generate() builds when given no
mask, as whisper_llm_zh calls it); in training the LLM gets positions 0..L-1 over the left-padded
rows, as whisper_llm_zh's training passes no position ids.
"""
from __future__ import annotations

import logging
import random
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmasr.aux_ctc import MODES as AUX_CTC_MODES, ctc_compress_frames, resolve_blank_id
from llmasr.ctc_prefix import CtcPrefixScorer
from llmasr.encoder_cache import EncoderOutputCache
from llmasr.features import data_feature_type_of
from llmasr.generation import GenerationOptions, generate
from llmasr.layers import autocast_to, decode_autocast_dtype
from llmasr.llm import decoder_and_head, merge_lora
from llmasr.projector import Projector
from llmasr.prompt import (
    IGNORE_INDEX,
    build_prompts,
    get_prompt_format,
    resolve_prompt_ids,
    sample_speech_groups,
)

class SpeechLLM(nn.Module):
    """Encoder(s) + projector(s) + LLM.

    Args:
        encoders: speech encoder modules (see llmasr.encoders); more than one (or ``mose=True``)
            gives the MoSE layout.
        llm: causal LM (optionally peft-wrapped), ``tokenizer``: its tokenizer with the speech tokens.
        prompt_format: name or :class:`~llmasr.prompt.PromptFormat`.
        downsample_rate, projector_activation, projector_dropout: see :class:`Projector`;
            ``downsample_rate`` may be a list with one rate per encoder.
        unfreeze_encoder: train the encoders (else frozen: eval mode, no_grad, even in ``train()``).
            SpeechLLM alone owns this for every encoder type; encoders are plain modules.
        use_prompt_embedding: really use the ``prompt_embedding`` rows (off: SpeechLLM behaviour).
        compat_reference_padding: splice the padded batch's frames like icefall whisper_llm_zh (see
            the module docstring); also settable as an attribute.
        ctc_compress_frames: None, or an aux CTC mode (``llmasr.aux_ctc.MODES``): the LLM reads the
            projected frames CTC-compressed (:func:`llmasr.aux_ctc.ctc_compress_frames`, blank = the
            prompt format's pad token, as the aux CTC's default) - for projectors aligned by the aux
            CTC in that mode.

    Every encoder gets the features of its own ``feature_type``: MoSE encoders of different front ends
    (Zipformer fbank, Whisper log-mel, FireRedASR fbank+CMVN) take ``features_by_type`` =
    {--feature-type: (features, lengths)} (the data module's batches for --feature-type a,b,c);
    ``features`` / ``feature_lens`` alone serve models whose encoders all take one type.
    ``feature_type`` / ``feature_dim`` are the first encoder's, ``feature_types`` / ``feature_dims``
    every encoder's.
    """

    def __init__(
        self,
        encoders: Sequence[nn.Module],
        llm: nn.Module,
        tokenizer,
        prompt_format="speechllm",
        downsample_rate: int = 4,
        projector_activation: str = "swooshr",
        projector_dropout: float = 0.1,
        unfreeze_encoder: bool = False,
        use_prompt_embedding: bool = False,
        mose: Optional[bool] = None,
        num_prompt: int = 4,
        compat_reference_padding: bool = False,
        ctc_compress_frames: Optional[str] = None,
    ):
        super().__init__()
        encoders = list(encoders)
        if not encoders:
            raise ValueError("SpeechLLM needs at least one speech encoder")
        self.feature_types = [getattr(e, "feature_type", None) for e in encoders]
        self.feature_dims = [getattr(e, "feature_dim", None) for e in encoders]
        dim_of_type = {}
        for t, d in zip(self.feature_types, self.feature_dims):
            if dim_of_type.setdefault(t, d) != d:  # encoders of one feature type share its features
                raise ValueError(f"speech encoders taking {t!r} features must take the same feature dims; "
                                 f"got {dim_of_type[t]} and {d}")
        # the --feature-type each encoder is fed (keys of features_by_type)
        self.input_feature_types = [data_feature_type_of(t) for t in self.feature_types]
        self.mose = len(encoders) > 1 if mose is None else bool(mose)
        if not self.mose and len(encoders) != 1:
            raise ValueError(f"{len(encoders)} encoders given but mose=False")
        many_rates = isinstance(downsample_rate, (list, tuple))
        rates = list(downsample_rate) if many_rates else [downsample_rate] * len(encoders)
        if len(rates) != len(encoders):
            raise ValueError(f"{len(rates)} projector downsample rates {rates} for {len(encoders)} speech encoders")
        hidden = llm.get_input_embeddings().weight.shape[1]
        projectors = [
            Projector(e.output_dim, hidden, int(r), projector_activation, projector_dropout)
            for e, r in zip(encoders, rates)
        ]
        if self.mose:
            self.encoder = nn.ModuleList(encoders)
            self.encoder_projector = nn.ModuleList(projectors)
        else:
            self.encoder = encoders[0]
            self.encoder_projector = projectors[0]
        self.llm = llm

        self.tokenizer = tokenizer
        self.prompt_format = get_prompt_format(prompt_format)
        # Only SpeechLLM's layout has the table: a key the other recipes' checkpoints never had
        # must not be required when they load.
        self.prompt_embedding = (
            nn.Embedding(num_prompt, hidden)
            if self.prompt_format.name == "speechllm" or use_prompt_embedding else None
        )
        self.prompt_ids = resolve_prompt_ids(tokenizer, self.prompt_format)
        self.use_prompt_embedding = use_prompt_embedding
        # Optional auxiliary CTC of the projector output against the LLM token embeddings, added to
        # the training loss (enable_aux_ctc; --aux-ctc-weight). Not a module: no parameters,
        # nothing in checkpoints.
        self.aux_ctc = None
        # Optional EncoderOutputCache (enable_encoder_cache; --cache-encoder-outputs in training).
        self.encoder_cache: Optional[EncoderOutputCache] = None
        # Autocast dtype of the encoders at decode (set_decode_dtype); None: as the caller runs them.
        self.encoder_autocast_dtype: Optional[torch.dtype] = None
        self.unfreeze_encoder = unfreeze_encoder
        self.downsample_rate = downsample_rate
        self.feature_type = self.feature_types[0]
        self.feature_dim = self.feature_dims[0]
        for e in encoders:
            e.requires_grad_(unfreeze_encoder)
        self.compat_reference_padding = compat_reference_padding
        if ctc_compress_frames in (None, "none"):
            ctc_compress_frames = None
        elif ctc_compress_frames not in AUX_CTC_MODES:
            raise ValueError(f"ctc_compress_frames must be none or one of {AUX_CTC_MODES}, got {ctc_compress_frames!r}")
        elif compat_reference_padding:
            raise ValueError("CTC-compressed frames and compat_reference_padding exclude each other")
        self.ctc_compress_frames = ctc_compress_frames
        self.ctc_blank_id = resolve_blank_id(tokenizer, "pad", self.prompt_format) if ctc_compress_frames else None
        if use_prompt_embedding:
            self._init_prompt_embedding()
        self.train(False)

    @torch.no_grad()
    def _init_prompt_embedding(self) -> None:
        """Start the used table from the LLM's own rows of those tokens (or, for ids beyond the
        embedding, from noise of the embedding's scale) instead of nn.Embedding's N(0, 1)."""
        emb = self.llm.get_input_embeddings().weight
        std = float(emb.float().std())
        for k, tok in enumerate(self.prompt_ids.prompt_embedding[: self.prompt_embedding.num_embeddings]):
            if 0 <= tok < emb.shape[0]:
                self.prompt_embedding.weight[k] = emb[tok].float()
            else:
                self.prompt_embedding.weight[k].normal_(0.0, std)

    # ------------------------------------------------------------------ structure

    @property
    def encoders(self) -> List[nn.Module]:
        return list(self.encoder) if self.mose else [self.encoder]

    @property
    def projectors(self) -> List[Projector]:
        return list(self.encoder_projector) if self.mose else [self.encoder_projector]

    @property
    def num_encoders(self) -> int:
        return len(self.encoders)

    @property
    def compat_reference_padding(self) -> bool:
        return self._compat_reference_padding

    @compat_reference_padding.setter
    def compat_reference_padding(self, value: bool) -> None:
        if value and getattr(self, "encoder_cache", None) is not None:
            raise ValueError("compat_reference_padding makes encoder outputs depend on the batch; "
                             "it cannot be combined with the encoder output cache")
        # One switch: encoders that can ignore the batch padding (``mask_padding``) follow it.
        self._compat_reference_padding = bool(value)
        for e in self.encoders:
            if hasattr(e, "mask_padding"):
                e.mask_padding = not value

    @property
    def llm_trainable(self) -> bool:
        return any(p.requires_grad for p in self.llm.parameters())

    def train(self, mode: bool = True):
        super().train(mode)
        # Frozen parts stay in eval mode (no dropout, no BN/stat updates) whatever the caller does.
        if not self.unfreeze_encoder:
            for e in self.encoders:
                e.eval()
        if not self.llm_trainable:
            self.llm.eval()
            if mode:
                # transformers checkpoints only modules in training mode: with gradient checkpointing
                # on (--grad-checkpointing), the modules that checkpoint - and not their children,
                # which hold the dropouts - train, so the frozen LLM's activations are recomputed.
                for m in self.llm.modules():
                    if getattr(m, "gradient_checkpointing", False) is True:
                        m.training = True
        return self

    # ------------------------------------------------------------------ pieces

    def enable_aux_ctc(self, aux_ctc) -> None:
        """Add ``aux_ctc.weight`` x the auxiliary CTC of the projected frames (:class:`llmasr.aux_ctc.AuxCtc`)
        to the training loss from now on; ``None`` turns it off. The stats of :meth:`forward` then
        carry its ``aux_ctc_*`` entries, so the logs show both terms."""
        self.aux_ctc = aux_ctc
        if aux_ctc is not None and aux_ctc.weight > 0:
            logging.info(f"training loss = CE + {aux_ctc.weight:g} x auxiliary CTC of the projector output "
                         f"(mode {aux_ctc.cfg.mode})")

    def enable_encoder_cache(self, max_gb: float = 4.0) -> EncoderOutputCache:
        """Keep frozen-encoder outputs by cut id (see :class:`EncoderOutputCache`)."""
        if self.unfreeze_encoder:
            raise ValueError("the encoder output cache needs a frozen encoder (--unfreeze-encoder is on)")
        if self.compat_reference_padding:
            raise ValueError("the encoder output cache needs batch-independent encoder outputs "
                             "(--compat-reference-padding is on)")
        self.encoder_cache = EncoderOutputCache(int(max_gb * 2**30))
        return self.encoder_cache

    def encode(
        self, features: torch.Tensor, feature_lens: torch.Tensor, cut_ids: Optional[Sequence[str]] = None,
        features_by_type: Optional[Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = None,
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Run every encoder + projector: list of (projected (N, T_k, H), lengths (N,)).

        ``cut_ids`` (with :meth:`enable_encoder_cache`): frozen-encoder outputs are looked up by
        cut id and only the cuts not seen before are encoded. ``features_by_type``: each encoder's
        features by type (see the class docstring).
        """
        out = []
        # A frozen encoder runs without autograd (no activations kept), whatever mode the caller is in.
        grad = self.unfreeze_encoder and self.training and torch.is_grad_enabled()
        autocast = self.encoder_autocast_dtype
        for idx, (encoder, projector) in enumerate(zip(self.encoders, self.projectors)):
            feats, lens = self._encoder_input(idx, features, feature_lens, features_by_type)
            with torch.set_grad_enabled(grad), autocast_to(feats.device.type, autocast):
                if self.encoder_cache is not None and cut_ids is not None and not grad:
                    enc_out, enc_lens = self._encode_cached(idx, encoder, feats, lens, cut_ids)
                else:
                    enc_out, enc_lens = encoder(feats, lens)
            frames, lens = projector(enc_out.to(projector.proj[1].weight.dtype), enc_lens)
            if self.compat_reference_padding:  # every row: all T // ds frames of the padded batch
                lens = torch.full_like(lens, frames.shape[1])
            out.append((frames, lens))
        return out

    def _encoder_input(self, idx: int, features, feature_lens, features_by_type):
        """(features, lengths) of the type encoder ``idx`` takes."""
        if features_by_type is None:
            if len(set(self.input_feature_types)) > 1:
                raise ValueError(f"the speech encoders take {self.input_feature_types} features: pass "
                                 f"features_by_type (the data module's batches with --feature-type "
                                 f"{','.join(self.input_feature_types)})")
            return features, feature_lens
        want = self.input_feature_types[idx]
        if want not in features_by_type:
            raise ValueError(f"speech encoder {idx} takes {want} features but the batch has only "
                             f"{sorted(features_by_type)} (--feature-type {','.join(self.input_feature_types)})")
        feats, lens = features_by_type[want]
        if feats.shape[0] != features.shape[0] or lens.shape[0] != features.shape[0]:
            raise ValueError(f"the {want} features hold {feats.shape[0]} utterances, the batch {features.shape[0]}")
        return feats, lens

    def _encode_cached(self, idx, encoder, features, feature_lens, cut_ids):
        if len(cut_ids) != features.shape[0]:
            raise ValueError(f"{len(cut_ids)} cut ids for a batch of {features.shape[0]} utterances")
        cache = self.encoder_cache
        rows: List[Optional[torch.Tensor]] = [cache.get((idx, c)) for c in cut_ids]
        missing = [i for i, r in enumerate(rows) if r is None]
        if missing:
            # Encode only the new cuts, cut to their own longest length (no extra padding).
            sel = torch.tensor(missing, device=features.device)
            sub_lens = feature_lens[sel]
            enc_out, enc_lens = encoder(features[sel, : int(sub_lens.max())], sub_lens)
            for j, i in enumerate(missing):
                rows[i] = enc_out[j, : int(enc_lens[j])]
                cache.put((idx, cut_ids[i]), rows[i])
        device = features.device
        rows = [r.to(device) for r in rows]
        lens = torch.tensor([r.shape[0] for r in rows], device=device, dtype=torch.long)
        return nn.utils.rnn.pad_sequence(rows, batch_first=True), lens

    def embed_prompt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        emb = self.llm.get_input_embeddings()
        rows = emb.weight.shape[0]
        # Ids beyond the embedding (only possible for tokens replaced below / by speech) look up row 0.
        embeds = emb(input_ids.masked_fill(input_ids >= rows, 0))
        if self.use_prompt_embedding:
            if self.prompt_embedding is None:
                raise ValueError("use_prompt_embedding is on but this model was built without a prompt_embedding "
                                 "table (build it with use_prompt_embedding=True)")
            for k, tok in enumerate(self.prompt_ids.prompt_embedding):
                if tok < 0:
                    continue
                where = ((input_ids == tok) & attention_mask).unsqueeze(-1)
                embeds = torch.where(where, self.prompt_embedding.weight[k].to(embeds.dtype), embeds)
        elif bool((input_ids[attention_mask] >= rows).any()):
            bad = sorted(set(input_ids[attention_mask & (input_ids >= rows)].tolist()) - {self.prompt_ids.speech})
            if bad:
                raise ValueError(f"prompt token ids {bad} do not fit the LLM embedding ({rows} rows)")
        return embeds

    def merge(
        self,
        speech: List[Tuple[torch.Tensor, torch.Tensor]],
        inputs_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        slot_encoders: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Replace each ``<speech>`` by its encoder's valid projected frames; left-pad the rows.

        Args:
            speech: per encoder (frames (B, T_e, H), lengths (B,)).
            inputs_embeds (B, P, H), input_ids (B, P), attention_mask (B, P) bool, labels (B, P).
            slot_encoders: (B, S) encoder index filling the s-th ``<speech>`` of each row
                (default: s-th encoder).

        Returns: merged embeddings (B, L, H), attention mask (B, L) bool, labels (B, L) or None.
        """
        b, p, h = inputs_embeds.shape
        device = inputs_embeds.device
        num_enc = len(speech)
        is_speech = (input_ids == self.prompt_ids.speech) & attention_mask
        n_slots = is_speech.sum(1)
        if bool((n_slots == 0).any()) or bool((n_slots > num_enc).any()):
            raise ValueError(
                f"every prompt needs 1..{num_enc} {self.prompt_format.speech_token} tokens, got {n_slots.tolist()}"
            )
        if slot_encoders is None:
            slot_encoders = torch.arange(num_enc, device=device).expand(b, num_enc)
        slot_encoders = slot_encoders.to(device)
        slot_of_pos = (torch.cumsum(is_speech.long(), 1) - 1).clamp(min=0)  # (B, P)
        enc_of_pos = torch.gather(slot_encoders, 1, slot_of_pos.clamp(max=slot_encoders.shape[1] - 1))
        lens = torch.stack([l.to(device) for _, l in speech], 1)  # (B, E)
        speech_len_of_pos = torch.gather(lens, 1, enc_of_pos)  # (B, P)

        token_len = torch.where(is_speech, speech_len_of_pos, attention_mask.long())  # 0 on padding
        total = token_len.sum(1)
        length = int(total.max())
        offset = length - total  # left padding of each merged row
        start = offset.unsqueeze(1) + torch.cumsum(token_len, 1) - token_len  # output position of token

        merged = inputs_embeds.new_zeros(b, length, h)
        text = attention_mask & ~is_speech
        rows, cols = text.nonzero(as_tuple=True)
        merged = merged.index_put((rows, start[rows, cols]), inputs_embeds[rows, cols])
        for e, (frames, _) in enumerate(speech):
            srows, scols = (is_speech & (enc_of_pos == e)).nonzero(as_tuple=True)
            if srows.numel() == 0:
                continue
            t = frames.shape[1]
            valid = torch.arange(t, device=device).unsqueeze(0) < speech_len_of_pos[srows, scols].unsqueeze(1)
            k, f = valid.nonzero(as_tuple=True)  # k indexes (srows, scols), f the frame
            r = srows[k]
            merged = merged.index_put((r, start[r, scols[k]] + f), frames[r, f].to(merged.dtype))
        mask = torch.arange(length, device=device).unsqueeze(0) >= offset.unsqueeze(1)
        merged_labels = None
        if labels is not None:
            merged_labels = torch.full((b, length), IGNORE_INDEX, dtype=labels.dtype, device=device)
            merged_labels[rows, start[rows, cols]] = labels[rows, cols]
        return merged, mask, merged_labels

    def _slot_assignment(self, groups: Sequence[int]) -> torch.Tensor:
        """MoSE training: the n kept groups of a prompt get n encoders drawn at random (random.sample,
        as SpeechLLM); with all groups kept the k-th group gets the k-th encoder."""
        e = self.num_encoders
        rows = []
        for n in groups:
            rows.append(list(range(e)) if n == e else random.sample(range(e), n) + [0] * (e - n))
        return torch.tensor(rows, dtype=torch.long)

    def prepare_inputs(
        self,
        features: torch.Tensor,
        feature_lens: torch.Tensor,
        texts: Optional[Sequence[str]] = None,
        num_speech_groups: Optional[Sequence[int]] = None,
        cut_ids: Optional[Sequence[str]] = None,
        features_by_type: Optional[Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = None,
    ):
        """Encoders + prompt + merge.

        Returns (inputs_embeds (B, L, H), attention_mask (B, L) bool, labels (B, L) or None,
        speech_lens (B, E) projected frames per encoder, per-encoder (frames, lengths)). With
        ``ctc_compress_frames`` the LLM reads the compressed frames; ``speech_lens`` and the returned
        frames stay the projector's (the audio's length, and what the aux CTC aligns).
        """
        device = features.device
        speech = self.encode(features, feature_lens, cut_ids, features_by_type)
        read = speech
        if self.ctc_compress_frames is not None:
            emb = self.llm.get_input_embeddings().weight
            read = [ctc_compress_frames(f, l, emb, self.ctc_blank_id, self.ctc_compress_frames) for f, l in speech]
        b = features.shape[0]
        e = self.num_encoders
        groups = [e] * b if num_speech_groups is None else list(num_speech_groups)
        input_ids, attention_mask, labels = build_prompts(
            self.tokenizer, self.prompt_format, texts, groups, batch_size=b
        )
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        labels = labels.to(device) if labels is not None else None
        slots = None if all(g == e for g in groups) else self._slot_assignment(groups)
        embeds = self.embed_prompt(input_ids, attention_mask)
        merged, mask, merged_labels = self.merge(read, embeds, input_ids, attention_mask, labels, slots)
        speech_lens = torch.stack([l for _, l in speech], 1)
        return merged, mask, merged_labels, speech_lens, speech

    # ------------------------------------------------------------------ training

    def forward(
        self, features: torch.Tensor, feature_lens: torch.Tensor, texts: Sequence[str],
        cut_ids: Optional[Sequence[str]] = None,
        features_by_type: Optional[Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = None,
    ) -> Tuple[torch.Tensor, Dict[str, Union[int, float, torch.Tensor]]]:
        """Mean cross-entropy over transcript tokens (+ end token), and stats.

        stats: ``loss_sum`` (summed CE, detached), ``num_tokens`` (label tokens), ``num_correct``
        (argmax hits, token accuracy = num_correct / num_tokens), ``acc``, ``num_utts``,
        ``num_speech_tokens``.
        """
        groups = None
        if self.training and self.num_encoders > 1:
            groups = sample_speech_groups(self.num_encoders, features.shape[0])
        merged, mask, labels, speech_lens, speech = self.prepare_inputs(features, feature_lens, texts, groups, cut_ids,
                                                                        features_by_type)
        if self.compat_reference_padding:
            # whisper_llm_zh's training passes no position ids: the LLM counts from the first
            # (left-padded) position.
            position_ids = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        else:
            # RoPE positions counted from the first real token (left padding), as in generate().
            position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        decoder, head = decoder_and_head(self.llm)
        hidden = decoder(
            inputs_embeds=merged, attention_mask=mask.long(), position_ids=position_ids, use_cache=False
        ).last_hidden_state
        # Next-token targets; only labelled positions go through the output layer (no B x L x V logits).
        targets = labels[:, 1:]
        selected = targets != IGNORE_INDEX
        logits = head(hidden[:, :-1][selected]).float()
        tgt = targets[selected]
        loss_sum = F.cross_entropy(logits, tgt, reduction="sum")
        num_tokens = int(tgt.numel())
        loss = loss_sum / max(num_tokens, 1)
        # Parameters that got no gradient this step (prompt_embedding when unused, MoSE projectors
        # whose group was dropped everywhere) are tied in with weight 0 so DDP/DeepSpeed need no
        # find_unused_parameters.
        dangling = []
        table = self.prompt_embedding
        if table is not None and not self.use_prompt_embedding and table.weight.requires_grad:
            dangling.append(table.weight.sum())
        if groups is not None:
            dangling.extend(frames.sum() for frames, _ in speech if frames.requires_grad)
        if dangling and torch.is_grad_enabled():
            loss = loss + 0.0 * sum(dangling)
        with torch.no_grad():
            num_correct = int((logits.argmax(-1) == tgt).sum())
        aux_stats = {}
        if self.aux_ctc is not None and self.aux_ctc.weight > 0 and self.training:
            aux_loss, aux_stats = self.aux_ctc(speech, texts)
            loss = loss + self.aux_ctc.weight * aux_loss
        stats = {
            **aux_stats,
            "loss_sum": float(loss_sum.detach()),
            "num_tokens": num_tokens,
            "num_correct": num_correct,
            "acc": num_correct / max(num_tokens, 1),
            "num_utts": int(features.shape[0]),
            "num_speech_tokens": int(speech_lens.sum()),
        }
        return loss, stats

    # ------------------------------------------------------------------ decoding

    def merge_lora_for_inference(self) -> "SpeechLLM":
        """Fold the LLM's LoRA adapters into its weights (:func:`llmasr.llm.merge_lora`), so that a
        decode step costs one matmul per projection. Call once after the checkpoint is loaded; the
        model is then for decoding only (the state dict loses the training layout). In fp32 the
        hypotheses are those of the unmerged model (the golden sets decode identically)."""
        self.llm = merge_lora(self.llm)
        return self

    def set_decode_dtype(self, dtype: torch.dtype) -> "SpeechLLM":
        """Decode in ``dtype``: the LLM weights are cast to it; the encoders keep fp32 weights and run
        under autocast to it (their matmuls in ``dtype``; residual stream, norms, softmax and Swoosh
        stay fp32, and on CPU their convolutions too - see the encoders' notes); the projectors stay
        fp32 and their output is cast to the LLM dtype when spliced. Merge LoRA first
        (:meth:`merge_lora_for_inference`): merging in fp32 and then casting rounds once. float32
        turns the autocast off. bfloat16 on CPUs with AVX512-BF16/AMX; float16 or bfloat16 on CUDA."""
        self.encoder_autocast_dtype = decode_autocast_dtype(dtype)
        self.llm.to(dtype)
        return self

    @torch.inference_mode()
    def generate_ids(
        self,
        features: torch.Tensor,
        feature_lens: torch.Tensor,
        beam_size: int = 1,
        max_new_tokens: Optional[int] = None,
        features_by_type: Optional[Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = None,
        ctc_weight: float = 0.0,
        ctc_mode: Optional[str] = None,
        ctc_candidates: int = 10,
        **gen_opts,
    ) -> torch.Tensor:
        """Generated token ids (B, N) of a batch (new tokens only, finished rows padded).

        ``ctc_weight`` > 0: joint decoding with the projector's aux CTC (:mod:`llmasr.ctc_prefix`;
        ``ctc_mode`` the aux CTC's mode, default the ``ctc_compress_frames`` one; the blank is the
        prompt format's pad token), over the LLM's ``ctc_candidates`` best next tokens per row."""
        import dataclasses

        if "num_beams" in gen_opts:  # SpeechLLM's / HF's name
            beam_size = gen_opts.pop("num_beams")
        known = {f.name for f in dataclasses.fields(GenerationOptions)}
        extra = {k: gen_opts.pop(k) for k in list(gen_opts) if k not in known}  # passed to HF generate
        merged, mask, _, speech_lens, speech = self.prepare_inputs(
            features, feature_lens, features_by_type=features_by_type
        )
        opts = GenerationOptions(beam_size=beam_size, **gen_opts)
        opts.extra.update(extra)
        if ctc_weight > 0:
            mode = ctc_mode or self.ctc_compress_frames
            if mode is None:
                raise ValueError("--ctc-weight needs the aux CTC's mode: --ctc-mode, or --ctc-compress-frames")
            if self.num_encoders != 1:
                raise ValueError(f"--ctc-weight supports one speech encoder; this model has {self.num_encoders}")
            frames, frame_lens = speech[0]
            scorer = CtcPrefixScorer(
                frames, frame_lens, self.llm.get_input_embeddings().weight,
                resolve_blank_id(self.tokenizer, "pad", self.prompt_format), self.prompt_ids.eos,
                mode=mode, weight=ctc_weight, num_beams=opts.beam_size,
                num_candidates=max(ctc_candidates, 2 * opts.beam_size),
            )
            opts.extra["logits_processor"] = list(opts.extra.get("logits_processor") or []) + [scorer]
        if max_new_tokens is not None:
            opts.max_new_tokens = max_new_tokens
        return generate(self.llm, merged, mask, self.prompt_ids, opts, speech_lens.sum(1))

    def decode(
        self,
        features: torch.Tensor,
        feature_lens: torch.Tensor,
        beam_size: int = 1,
        max_new_tokens: Optional[int] = None,
        features_by_type: Optional[Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = None,
        **gen_opts,
    ) -> List[str]:
        ids = self.generate_ids(features, feature_lens, beam_size, max_new_tokens, features_by_type, **gen_opts)
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)


__all__ = ["SpeechLLM"]
