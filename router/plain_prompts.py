"""Prompts that ask for nothing in particular: the zero-shot selector's background.

A clause of a prompt counts for an adapter only as far as it is closer to that adapter's
description and example prompts than to every one of these (router/zero_shot.py). They cover
ordinary questions, tasks and chat, so that topic words shared with an adapter's examples do
not select it. Keep them free of
any style request (length, format, tone, language, persona), and free of bare instructions
("Answer the question.", "Please."): those resemble the start of every style request and, measured
on the demo adapters, hid requests like "Short answer please" (accuracy 94% -> 98%).
"""

PLAIN_PROMPTS: tuple[str, ...] = (
    "What is the capital of Japan?", "How do I boil pasta?", "Explain how a rocket reaches orbit.",
    "Why do leaves fall in autumn?", "What is the Pythagorean theorem?",
    "How does a microwave oven heat food?", "Who wrote Romeo and Juliet?", "What causes thunder?",
    "How can I become a better public speaker?", "Describe the life cycle of a butterfly.",
    "What is the difference between weather and climate?", "How do I change a light bulb safely?",
    "What are the benefits of drinking water?", "Explain supply and demand.",
    "How does the immune system fight infections?", "What is quantum computing?",
    "Write a poem about the sea.", "Give me three tips for studying for exams.",
    "How do I make pancakes?", "What is the population of Brazil?", "Explain the rules of chess.",
    "What is an operating system?", "How do electric cars work?",
    "Why was the Roman Empire important?", "Tell me a fun fact about octopuses.",
    "How do I write a cover letter?", "What is a mortgage?", "Explain recursion in programming.",
    "What is the meaning of the word 'ephemeral'?", "How do I get rid of hiccups?",
    "What is the tallest building in the world?", "Tell me the story of Cinderella.",
    "How do solar eclipses happen?", "What should I pack for a camping trip?",
    "Can you help me plan a birthday party?",
    "What is the difference between a virus and a bacterium?",
    "Write a SQL query that counts the rows of a table.", "How do I center a div in CSS?",
    "What does a prime minister do?", "Explain how a credit score works.",
    "Describe the taste of coffee.", "How many planets are in the solar system?",
    "Give me a recipe for tomato soup.", "How does the stock market work?",
    "What is mindfulness meditation?", "Recommend a good book about history.",
    "How do I train a puppy to sit?", "What language is spoken in Argentina?",
    "Explain what an API is.", "Write a story about a dragon who loves books.",
    "How do tides work?", "What is the human genome?", "Compare renting and buying a house.",
    "What is the best way to learn the guitar?", "Hi! How are you today?",
    "Thanks for your help yesterday.", "Translate 'thank you' into French.",
    "List the steps to set up a home Wi-Fi network.", "What is a neural network?",
)
