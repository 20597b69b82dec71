"""Rebuild the bundled demo: customer-support data, byte-level BPE tokenizer, tiny Llama config.

Everything under ``distsft/demo/`` except ``config.yaml`` is produced by this script, deterministically
(fixed seed), so anyone can regenerate and diff it:

    python scripts/build_demo.py

The data is synthetic on purpose: it must be redistributable, need no hub access, and be learnable by a
few-million-parameter model in a couple of CPU minutes, while still looking like real SFT data (system
prompts or none, multi-turn conversations, several languages and scripts).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DEMO = Path(__file__).resolve().parent.parent / "distsft" / "demo"
SEED = 1234
N_CONVERSATIONS = 1200
VOCAB_SIZE = 3072

# The classic example every SFT tutorial starts from; `distsft generate` is checked against it.
CLASSIC_Q = "My internet connection is slow. Can you help me troubleshoot?"
CLASSIC_A = (
    "Let's start by restarting your router. Unplug it, wait 30 seconds, and plug it back in. "
    "When the lights are steady, run a speed test and tell me the result."
)

# topic -> language -> (user phrasings, assistant answer, follow-up user turn, follow-up answer)
TOPICS: dict[str, dict[str, tuple[list[str], str, str, str]]] = {
    "slow_internet": {
        "en": (
            [
                CLASSIC_Q,
                "My internet is really slow today. Can you help me troubleshoot?",
                "The connection at home is very slow. What should I do?",
                "Why is my Wi-Fi so slow? Please help.",
            ],
            CLASSIC_A,
            "I restarted it and the speed test says 5 Mbps. My plan is 100 Mbps.",
            "Thanks for testing. Please connect a computer to the router with a cable and run the test "
            "again. If it is still below 20 Mbps, I will open a line check for your address.",
        ),
        "es": (
            ["Mi conexión a internet es lenta. ¿Puedes ayudarme a solucionarlo?"],
            "Empecemos por reiniciar el router. Desenchúfalo, espera 30 segundos y vuelve a enchufarlo. "
            "Cuando las luces estén fijas, haz un test de velocidad y dime el resultado.",
            "Ya lo reinicié y sigue lento.",
            "Gracias. Conecta un ordenador al router con un cable y repite el test. Si sigue lento, "
            "abriré una revisión de tu línea.",
        ),
        "fr": (
            ["Ma connexion internet est lente. Pouvez-vous m'aider à résoudre le problème ?"],
            "Commençons par redémarrer votre routeur. Débranchez-le, attendez 30 secondes, puis "
            "rebranchez-le. Quand les voyants sont fixes, faites un test de débit et dites-moi le résultat.",
            "C'est fait, mais c'est toujours lent.",
            "Merci. Branchez un ordinateur au routeur avec un câble et refaites le test. Si le débit reste "
            "faible, j'ouvrirai une vérification de votre ligne.",
        ),
        "de": (
            ["Meine Internetverbindung ist langsam. Können Sie mir bei der Fehlersuche helfen?"],
            "Beginnen wir mit einem Neustart Ihres Routers. Ziehen Sie den Stecker, warten Sie 30 Sekunden "
            "und stecken Sie ihn wieder ein. Wenn die Lämpchen ruhig leuchten, machen Sie einen Speedtest.",
            "Habe ich gemacht, es ist immer noch langsam.",
            "Danke. Verbinden Sie bitte einen Computer per Kabel mit dem Router und testen Sie erneut. "
            "Bleibt es langsam, beauftrage ich eine Leitungsprüfung.",
        ),
        "zh": (
            ["我的网速很慢。你能帮我排查一下吗？"],
            "我们先重启路由器。拔掉电源，等待30秒，然后重新插上。指示灯稳定后，请做一次网速测试并告诉我结果。",
            "我重启了，还是很慢。",
            "谢谢。请用网线把电脑连接到路由器，再测一次。如果仍然很慢，我会为您的线路申请检测。",
        ),
        "ja": (
            ["インターネットの接続が遅いです。トラブルシューティングを手伝ってもらえますか？"],
            "まずルーターを再起動しましょう。電源を抜いて30秒待ち、もう一度差し込んでください。"
            "ランプが安定したら速度テストを行い、結果を教えてください。",
            "再起動しましたが、まだ遅いです。",
            "ありがとうございます。パソコンをケーブルでルーターにつないで、もう一度テストしてください。"
            "それでも遅い場合は回線の点検を手配します。",
        ),
        "ru": (
            ["Мой интернет работает медленно. Можете помочь разобраться?"],
            "Давайте начнём с перезагрузки роутера. Отключите его от сети, подождите 30 секунд и "
            "включите снова. Когда индикаторы перестанут мигать, проверьте скорость и сообщите результат.",
            "Перезагрузил, всё ещё медленно.",
            "Спасибо. Подключите компьютер к роутеру кабелем и повторите тест. Если скорость не вырастет, "
            "я оформлю проверку линии.",
        ),
        "ar": (
            ["اتصال الإنترنت لدي بطيء. هل يمكنك مساعدتي في حل المشكلة؟"],
            "لنبدأ بإعادة تشغيل جهاز الراوتر. افصله عن الكهرباء وانتظر 30 ثانية ثم أعد توصيله. "
            "عندما تستقر الأضواء، أجرِ اختبار سرعة وأخبرني بالنتيجة.",
            "أعدت تشغيله وما زال بطيئًا.",
            "شكرًا لك. وصّل الحاسوب بالراوتر بكابل وأعد الاختبار. إذا بقي بطيئًا سأطلب فحص الخط.",
        ),
    },
    "password_reset": {
        "en": (
            [
                "I forgot my password. How do I reset it?",
                "I can't log in because I lost my password.",
                "How can I change my account password?",
            ],
            'No problem. Go to the sign-in page and click "Forgot password". Enter your email address '
            "and we will send you a reset link that is valid for 1 hour.",
            "I didn't get the email.",
            "Please check your spam folder first. If it is not there, tell me the email address on the "
            "account and I will resend the link.",
        ),
        "es": (
            ["Olvidé mi contraseña. ¿Cómo la restablezco?"],
            'No hay problema. Ve a la página de inicio de sesión y pulsa "¿Olvidaste tu contraseña?". '
            "Te enviaremos un enlace válido durante 1 hora.",
            "No me ha llegado el correo.",
            "Revisa la carpeta de spam. Si no está allí, dime tu correo y te reenviaré el enlace.",
        ),
        "zh": (
            ["我忘记密码了，怎么重置？"],
            "没问题。请在登录页面点击“忘记密码”，输入您的邮箱，我们会发送一个1小时内有效的重置链接。",
            "我没有收到邮件。",
            "请先查看垃圾邮件文件夹。如果没有，请告诉我账户邮箱，我会重新发送链接。",
        ),
        "ru": (
            ["Я забыл пароль. Как его сбросить?"],
            "Без проблем. На странице входа нажмите «Забыли пароль?» и введите адрес почты. Мы пришлём "
            "ссылку для сброса, она действует 1 час.",
            "Письмо не пришло.",
            "Проверьте папку «Спам». Если письма нет, напишите адрес почты, и я отправлю ссылку снова.",
        ),
    },
    "billing": {
        "en": (
            [
                "Why is my bill higher than usual this month?",
                "I was charged more than expected on my last invoice.",
            ],
            "I'm sorry about the surprise. Bills are usually higher when a promotional discount ends or "
            "when extra services were used. I can go through the invoice with you line by line.",
            "Yes, please explain the extra charge.",
            "The extra 10 euros is the end of your 6-month discount. I can add a loyalty discount of 5 "
            "euros per month if you would like.",
        ),
        "de": (
            ["Warum ist meine Rechnung diesen Monat höher als sonst?"],
            "Das tut mir leid. Meist endet ein Rabatt oder es wurden Zusatzleistungen genutzt. Ich gehe "
            "die Rechnung gern Zeile für Zeile mit Ihnen durch.",
            "Ja, bitte erklären Sie den Aufpreis.",
            "Die 10 Euro mehr kommen vom Ende Ihres 6-Monats-Rabatts. Ich kann Ihnen einen Treuerabatt "
            "von 5 Euro pro Monat geben.",
        ),
        "ja": (
            ["今月の請求額がいつもより高いのはなぜですか？"],
            "ご不便をおかけして申し訳ありません。割引期間の終了や追加サービスの利用が主な理由です。"
            "明細を一行ずつ一緒に確認しましょう。",
            "はい、追加料金について説明してください。",
            "追加の10ユーロは6か月割引の終了によるものです。ご希望なら毎月5ユーロの継続割引を適用できます。",
        ),
    },
    "refund": {
        "en": (
            ["I want a refund for my order.", "How do I return an item and get my money back?"],
            'You can return any item within 30 days. Open your orders page, choose "Return item", and '
            "print the free label. The refund reaches your card 3 to 5 days after we receive it.",
            "Can I get the refund as store credit instead?",
            'Yes. Choose "Store credit" when you start the return and the credit is added as soon as '
            "the parcel is scanned.",
        ),
        "fr": (
            ["Je voudrais être remboursé pour ma commande."],
            "Vous pouvez retourner un article sous 30 jours. Dans vos commandes, choisissez « Retourner "
            "l'article » et imprimez l'étiquette gratuite. Le remboursement arrive sous 3 à 5 jours.",
            "Puis-je avoir un avoir à la place ?",
            "Oui. Choisissez « Avoir » au début du retour ; il est crédité dès que le colis est scanné.",
        ),
        "ar": (
            ["أريد استرداد المبلغ لطلبي."],
            "يمكنك إرجاع أي منتج خلال 30 يومًا. افتح صفحة الطلبات واختر «إرجاع المنتج» واطبع الملصق "
            "المجاني. يصل المبلغ إلى بطاقتك خلال 3 إلى 5 أيام من استلامنا للطرد.",
            "هل يمكنني الحصول على رصيد في المتجر بدلًا من ذلك؟",
            "نعم. اختر «رصيد المتجر» عند بدء الإرجاع وسيضاف الرصيد فور مسح الطرد.",
        ),
    },
    "shipping": {
        "en": (
            ["Where is my package? It hasn't arrived yet.", "My order is late. When will it arrive?"],
            "Sorry for the wait. Please send me your order number and I will check the tracking status "
            "with the carrier right away.",
            "The order number is 48213.",
            "Thank you. Order 48213 left our warehouse yesterday and is due to arrive tomorrow before 6 pm.",
        ),
        "es": (
            ["¿Dónde está mi paquete? Todavía no ha llegado."],
            "Perdona la espera. Envíame el número de pedido y consultaré el seguimiento con la empresa de "
            "transporte ahora mismo.",
            "El número de pedido es 48213.",
            "Gracias. El pedido 48213 salió ayer del almacén y llegará mañana antes de las 18:00.",
        ),
        "zh": (
            ["我的包裹在哪里？还没有到。"],
            "抱歉让您久等了。请把订单号发给我，我马上为您查询物流状态。",
            "订单号是48213。",
            "谢谢。订单48213昨天已从仓库发出，预计明天下午6点前送达。",
        ),
    },
    "account_locked": {
        "en": (
            ["My account is locked. What happened?", 'I get an "account locked" error when I sign in.'],
            "For your security, accounts lock after 5 failed sign-in attempts. The lock lifts by itself "
            "after 15 minutes, or I can unlock it now after a quick identity check.",
            "Please unlock it now.",
            "Of course. I have sent a 6-digit code to your phone. Read it to me and I will unlock the account.",
        ),
        "ko": (
            ["계정이 잠겼어요. 무슨 일인가요?"],
            "보안을 위해 로그인에 5번 실패하면 계정이 잠깁니다. 15분 후 자동으로 풀리며, 본인 확인 후 "
            "지금 바로 해제해 드릴 수도 있습니다.",
            "지금 해제해 주세요.",
            "알겠습니다. 휴대폰으로 6자리 코드를 보냈습니다. 코드를 알려 주시면 계정을 해제하겠습니다.",
        ),
    },
    "app_crash": {
        "en": (
            ["The app keeps crashing when I open it.", "Your mobile app closes as soon as it starts."],
            "Sorry about that. Please update the app to the latest version, then restart your phone. If "
            "it still crashes, clear the app's cache in your phone settings.",
            "I updated it and it still crashes. 😞",
            "Thanks for trying. Please tell me your phone model and system version so our engineers can "
            "reproduce the crash. 🙏",
        ),
        "hi": (
            ["ऐप खोलते ही बंद हो जाता है।"],
            "इसके लिए खेद है। कृपया ऐप को नवीनतम संस्करण में अपडेट करें और फ़ोन को रीस्टार्ट करें। फिर भी "
            "समस्या हो तो सेटिंग्स में ऐप का कैश साफ़ करें।",
            "अपडेट कर दिया, फिर भी बंद हो रहा है।",
            "धन्यवाद। कृपया अपने फ़ोन का मॉडल और सिस्टम संस्करण बताइए ताकि हमारी टीम जाँच कर सके।",
        ),
    },
    "cancel": {
        "en": (
            ["How do I cancel my subscription?", "I want to cancel my plan."],
            "I'm sorry to see you go. You can cancel any time under Account > Subscription > Cancel. "
            "Your plan stays active until the end of the current billing period.",
            "Will I lose my saved data?",
            "Your data is kept for 90 days after cancellation, so you can come back without losing anything.",
        ),
        "ru": (
            ["Как отменить подписку?"],
            "Жаль, что вы уходите. Отменить можно в разделе Аккаунт > Подписка > Отменить. Подписка "
            "действует до конца текущего периода.",
            "Мои данные удалятся?",
            "Данные хранятся 90 дней после отмены, так что вы сможете вернуться без потерь.",
        ),
    },
    "address": {
        "en": (
            ["How do I change my delivery address?", "I moved. Can I update my address?"],
            "Congratulations on the move! Go to Account > Addresses, add the new address and set it as "
            "the default. Orders that have not shipped yet can be updated from the orders page.",
            "One order has already shipped.",
            "Then I will ask the carrier to redirect it. Please send me the order number and the new address.",
        ),
        "fr": (
            ["Comment changer mon adresse de livraison ?"],
            "Allez dans Compte > Adresses, ajoutez la nouvelle adresse et définissez-la par défaut. Les "
            "commandes pas encore expédiées peuvent être modifiées depuis la page des commandes.",
            "Une commande est déjà partie.",
            "Je vais demander au transporteur de la rediriger. Envoyez-moi le numéro de commande et la "
            "nouvelle adresse.",
        ),
    },
    "wifi_drops": {
        "en": (
            ["My Wi-Fi keeps disconnecting.", "The wireless connection drops every few minutes."],
            "Let's find the cause. Move the router to an open, central spot away from the microwave, and "
            "switch your devices to the 5 GHz network if they support it.",
            "It still drops in the bedroom.",
            "The signal is probably too weak there. A mesh extender would help; I can send you one at no cost.",
        ),
        "de": (
            ["Mein WLAN bricht ständig ab."],
            "Suchen wir die Ursache. Stellen Sie den Router frei und zentral auf, weg von der Mikrowelle, "
            "und nutzen Sie das 5-GHz-Netz, wenn Ihre Geräte es unterstützen.",
            "Im Schlafzimmer bricht es immer noch ab.",
            "Dort ist das Signal wohl zu schwach. Ein Mesh-Verstärker hilft; ich kann Ihnen kostenlos einen schicken.",
        ),
    },
}

SYSTEM_PROMPTS = {
    "en": [
        "You are a friendly customer-support assistant for an internet and online-shopping company.",
        "You are a concise, polite support agent. Answer in the customer's language.",
        "You help customers of Acme Telecom. Be clear and practical.",
    ],
    "es": ["Eres un asistente de atención al cliente amable y claro."],
    "fr": ["Vous êtes un assistant du service client, aimable et précis."],
    "de": ["Sie sind ein freundlicher Kundenservice-Assistent."],
    "zh": ["你是一名友好的客服助手。"],
    "ja": ["あなたは丁寧なカスタマーサポート担当です。"],
    "ru": ["Вы вежливый помощник службы поддержки."],
    "ar": ["أنت مساعد خدمة عملاء ودود."],
    "ko": ["당신은 친절한 고객 지원 상담원입니다."],
    "hi": ["आप एक विनम्र ग्राहक सहायता सहायक हैं।"],
}

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]

MODEL_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
}


def make_conversations(rng: random.Random, n: int) -> list[dict]:
    """English dominates (as in real support logs), and the classic question is common enough to learn."""
    pairs = [(t, lang) for t, langs in TOPICS.items() for lang in langs]
    weights = [(6.0 if lang == "en" else 1.0) * (2.0 if t == "slow_internet" else 1.0) for t, lang in pairs]
    rows = []
    for _ in range(n):
        topic, lang = rng.choices(pairs, weights)[0]
        questions, answer, follow_q, follow_a = TOPICS[topic][lang]
        messages = []
        if rng.random() < 0.4:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS[lang])})
        messages.append({"role": "user", "content": rng.choice(questions)})
        messages.append({"role": "assistant", "content": answer})
        if rng.random() < 0.3:
            messages.append({"role": "user", "content": follow_q})
            messages.append({"role": "assistant", "content": follow_a})
        rows.append({"messages": messages, "topic": topic, "lang": lang})
    return rows


def train_tokenizer(texts: list[str], out: Path) -> None:
    """Byte-level BPE: every UTF-8 string maps to bytes first, so any text round-trips exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>"],
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL_CONFIG["max_position_embeddings"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    # transformers 5 writes its internal backend class name; the portable name loads in 4.x and 5.x alike.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def main() -> None:
    rng = random.Random(SEED)
    rows = make_conversations(rng, N_CONVERSATIONS)
    data_dir = DEMO / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "support.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    # Train the tokenizer on every string the demo can produce, plus the scaffolding of the template.
    texts = [m["content"] for r in rows for m in r["messages"]]
    texts += [q for langs in TOPICS.values() for qs, *_ in langs.values() for q in qs]
    texts += ["system\n", "user\n", "assistant\n"] * 50
    train_tokenizer(texts, DEMO / "tokenizer")

    model_dir = DEMO / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO / "tokenizer")
    cfg = dict(MODEL_CONFIG, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    cfg["bos_token_id"] = tok.convert_tokens_to_ids("<|im_start|>")
    (model_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    print(f"wrote {len(rows)} conversations, tokenizer with {len(tok)} tokens, model config to {DEMO}")


if __name__ == "__main__":
    main()
